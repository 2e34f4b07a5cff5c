"""``o2mkd-ray``: distill | sample | eval | tune | analyze | teacher.

Bad input fails here, before any Ray work, with one line that names the key or path; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from o2mkd_ray.cli.console import quiet_libraries, setup_console
from o2mkd_ray.cli.sample import sample_command


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``), like the config errors; subparsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="o2mkd-ray", description="One-to-many KD of diffusion models on Ray")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("distill", help="distil the teacher into N segment students")
    d.add_argument("config", nargs="?", help="pipelines/*.yaml (default: the embedded digits default)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--out", default=None, help="run folder (default runs/<name>)")
    d.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, train nothing")
    d.add_argument("--engine", choices=["ray", "local"], default="ray",
                   help="ray: one TorchTrainer per segment, concurrently (default); local: in-process, sequential")
    d.add_argument("--no-eval", action="store_true", help="skip the quick evaluation at the end")
    d.add_argument("--verbose", action="store_true",
                   help="also show Ray's and MLflow's own output (by default in OUT/logs/driver.log and Ray's logs)")
    _debug_flag(d)

    s = sub.add_parser("sample", help="sample a saved O2MKD pipeline folder")
    s.add_argument("pipeline_dir")
    s.add_argument("--num-images", type=int, default=16)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--scheduler", default=None, help="ddim | ddpm | dpm | ... (default: the saved one)")
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output", default=None, help="PNG path (default PIPELINE_DIR/../samples_cli.png)")
    s.add_argument("--prompt", action="append", default=None,
                   help="text-to-image pipelines: a prompt (repeat for several; --num-images images each)")
    s.add_argument("--negative-prompt", default=None)
    s.add_argument("--class-label", type=int, action="append", default=None,
                   help="DiT pipelines: a class id (repeat for several; --num-images images each)")
    s.add_argument("--guidance-scale", type=float, default=7.5,
                   help="classifier-free guidance (text-to-image, DiT)")
    _debug_flag(s)

    from o2mkd_ray.cli.analyze import add_analyze_parser
    from o2mkd_ray.cli.evaluate import add_eval_parser
    from o2mkd_ray.cli.tune import add_tune_parser

    for add in (add_eval_parser, add_tune_parser, add_analyze_parser):
        _debug_flag(add(sub))

    t = sub.add_parser("teacher", help="train a small UNet2DModel teacher (how the embedded default was made)")
    t.add_argument("config")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out", default=None)
    _debug_flag(t)
    return p


def _debug_flag(p: argparse.ArgumentParser) -> None:
    # `o2mkd-ray distill ... --debug` works as well as `o2mkd-ray --debug distill ...`
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _distill(args) -> int:
    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.engine.ray_compat import check_ray_address
    from o2mkd_ray.engine.session import preflight

    cfg = load_config(args.config or _default_config(), args.overrides)
    if args.no_eval:
        cfg.eval.enabled = False
    # every check of the input, once, before any Ray work: teacher files, segments vs the teacher's T, student
    # shapes, data, the output folder
    out = preflight(cfg, args.out or f"runs/{cfg.name}", strict=not args.dry_run)
    if args.engine == "ray" and not args.dry_run:  # a dry run may be meant for another machine's cluster
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        check_ray_address(address, "ray.address" if cfg.ray.address else "RAY_ADDRESS")
        from o2mkd_ray.engine.storage import check_storage

        check_storage(cfg.ray.storage_path)  # endpoint, bucket, credentials of an s3:// storage path
    if args.dry_run:
        print(cfg.to_json())
        print("dry run: config is valid", file=sys.stderr)
        return 0
    log_file = setup_console(out / "logs" / "driver.log", args.verbose)
    print(f"o2mkd-ray distill → {out}  (engine {args.engine}; log {log_file})", flush=True)
    from o2mkd_ray.engine.driver import run_distillation
    from o2mkd_ray.engine.session import run_local

    if args.engine == "ray":
        report = run_distillation(cfg, out, checked=True, verbose=args.verbose)
    else:
        report = run_local(cfg, out, checked=True)
    print(summary_lines(report, out, log_file), flush=True)
    return 0


def _pipeline_class(out: Path) -> str:
    """The saved pipeline's class name (``model_index.json``), for the line that says how to load it."""
    try:
        return json.loads((out / "pipeline" / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError):
        return "O2MKDPipeline"


def summary_lines(report: dict, out: Path, log_file: Path | None) -> str:
    """The end of ``distill``: what was made and where (pipeline, samples, report, MLflow run, logs)."""
    segs = report["segments"]
    ml = report.get("mlflow") or {}
    lines = [f"done in {report['wall_s']:.0f} s: {len(segs)} students, sampling MACs "
             f"{report['macs_ratio_per_step']:.3f}x the teacher's "
             + ", ".join(f"seg-{s['index']:02d} loss {s['final_loss']:.4f}" for s in segs if s.get("final_loss")),
             f"  pipeline  {out / 'pipeline'}   ({_pipeline_class(out)}.from_pretrained)",
             f"  samples   {out / 'samples.png'}",
             f"  report    {out / 'report.json'}"]
    if ml.get("run_id"):
        lines.append(f"  MLflow    run {ml['run_id']} at {ml.get('tracking_uri')}")
    if log_file is not None:
        lines.append(f"  log       {log_file}")
    return "\n".join(lines)


def _default_config() -> str:
    here = Path(__file__).resolve().parents[2] / "pipelines" / "digits.yaml"
    return str(here) if here.is_file() else None


def _teacher(args) -> int:
    from o2mkd_ray.distill.teacher_train import load_teacher_train_config, train_teacher

    cfg = load_teacher_train_config(args.config, args.overrides)
    print(json.dumps({k: v for k, v in train_teacher(cfg, out=args.out).items() if k != "config"}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    setup_console(None, verbose=getattr(args, "verbose", False))

    try:
        from o2mkd_ray.cli.analyze import run_analyze_cli
        from o2mkd_ray.cli.evaluate import run_eval_cli
        from o2mkd_ray.cli.tune import run_tune_cli

        commands = {"distill": _distill, "sample": sample_command, "teacher": _teacher, "eval": run_eval_cli,
                    "tune": run_tune_cli, "analyze": run_analyze_cli}
        return commands[args.cmd](args)
    except Exception as e:
        if not _user_error(e) or args.debug:
            raise
        msg = "; ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
        print(f"error: {msg}", file=sys.stderr)  # one line; --debug for the traceback
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with the same --out to resume", file=sys.stderr)
        return 130


def _user_error(e: BaseException) -> bool:
    """Bad input (config, paths, checkpoints) rather than a bug: shown as one line, not a traceback."""
    from o2mkd_ray.errors import CheckpointError, ConfigError

    return isinstance(e, (ConfigError, CheckpointError))


if __name__ == "__main__":
    sys.exit(main())
