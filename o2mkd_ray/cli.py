"""``o2mkd-ray``: distill | sample | teacher (| eval | tune | analyze as they land).

Bad input fails here, before any Ray work, with one line that names the key or path; ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="o2mkd-ray", description="One-to-many KD of diffusion models on Ray")
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

    s = sub.add_parser("sample", help="sample a saved O2MKD pipeline folder")
    s.add_argument("pipeline_dir")
    s.add_argument("--num-images", type=int, default=16)
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--scheduler", default=None, help="ddim | ddpm | dpm | ... (default: the saved one)")
    s.add_argument("--eta", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--output", default=None, help="PNG path (default PIPELINE_DIR/../samples_cli.png)")

    from .evaluation import add_eval_parser

    add_eval_parser(sub)

    t = sub.add_parser("teacher", help="train a small UNet2DModel teacher (how the embedded default was made)")
    t.add_argument("config")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out", default=None)
    return p


def _distill(args) -> int:
    from . import config as C

    cfg = C.load(args.config or _default_config(), args.overrides)
    if args.no_eval:
        cfg.eval.enabled = False
    out = Path(args.out or f"runs/{cfg.name}")
    from .driver import preflight

    out = preflight(cfg, out, strict=not args.dry_run)
    print(cfg.to_json() if args.dry_run else f"o2mkd-ray distill → {out}")
    if args.dry_run:
        print("dry run: config is valid", file=sys.stderr)
        return 0
    from .driver import run_distillation, run_local

    report = (run_distillation if args.engine == "ray" else run_local)(cfg, out)
    print(json.dumps({"out": str(out), "wall_s": report["wall_s"], "segments": [
        {k: s[k] for k in ("index", "boundaries", "steps", "final_loss", "params", "macs")} for s in report["segments"]
    ], "samples": str(out / "samples.png")}, indent=2, default=str))
    return 0


def _default_config() -> str:
    here = Path(__file__).resolve().parent.parent / "pipelines" / "digits.yaml"
    return str(here) if here.is_file() else None


def _sample(args) -> int:
    import torch

    from .assemble import make_scheduler, save_grid
    from .config import ConfigError
    from .pipeline import O2MKDPipeline

    d = Path(args.pipeline_dir)
    if not (d / "model_index.json").is_file():
        raise ConfigError(f"pipeline folder {str(d)!r} has no model_index.json; give OUT/pipeline of a distill run")
    idx = json.loads((d / "model_index.json").read_text())
    if idx.get("_class_name") != "O2MKDPipeline":
        raise ConfigError(f"pipeline folder {str(d)!r} holds a {idx.get('_class_name')}, not an O2MKDPipeline")
    pipe = O2MKDPipeline.from_pretrained(d)
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    g = torch.Generator().manual_seed(args.seed)
    imgs = pipe(batch_size=args.num_images, generator=g, num_inference_steps=args.steps, eta=args.eta,
                output_type="np").images
    out = Path(args.output or d.parent / "samples_cli.png")
    save_grid([imgs], [f"{type(pipe.scheduler).__name__} {args.steps} steps"], out)
    print(str(out))
    return 0


def _teacher(args) -> int:
    from .teacher_train import load_teacher_train_config, train_teacher

    cfg = load_teacher_train_config(args.config, args.overrides)
    print(json.dumps({k: v for k, v in train_teacher(cfg, out=args.out).items() if k != "config"}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from .config import ConfigError

    try:
        from .evaluation import run_eval_cli

        return {"distill": _distill, "sample": _sample, "teacher": _teacher, "eval": run_eval_cli}[args.cmd](args)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command with the same --out to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
