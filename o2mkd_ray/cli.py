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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``), like the config errors; subparsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")


def _parser() -> argparse.ArgumentParser:
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
    s.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (text-to-image)")
    _debug_flag(s)

    from .analysis import add_analyze_parser
    from .evaluation import add_eval_parser
    from .tuning import add_tune_parser

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
    from . import config as C

    cfg = C.load(args.config or _default_config(), args.overrides)
    if args.no_eval:
        cfg.eval.enabled = False
    out = C.check_out_path(args.out or f"runs/{cfg.name}")
    from .driver import preflight
    from .teacher import check_run

    check_run(cfg)  # teacher files, segments vs the teacher's T, student shapes: all before any Ray work
    out = preflight(cfg, out, strict=not args.dry_run)
    if args.engine == "ray" and not args.dry_run:  # a dry run may be meant for another machine's cluster
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        C.check_ray_address(address, "ray.address" if cfg.ray.address else "RAY_ADDRESS")
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


# pipeline class -> its folders (the students' folder first)
PIPELINE_COMPONENTS = {"O2MKDPipeline": ("students", "scheduler"),
                       "O2MKDStableDiffusionPipeline": ("unet", "scheduler", "vae", "text_encoder", "tokenizer")}


def check_pipeline_dir(d: Path) -> dict:
    """A saved O2MKD pipeline folder: model_index.json of the right class, its components, intact weights.

    Returns:
        The scheduler config (for range checks on ``--steps``).
    """
    from .config import ConfigError
    from .teacher import check_safetensors

    if not d.is_dir():
        raise ConfigError(f"pipeline folder {str(d)!r} does not exist; give OUT/pipeline of a distill run")
    if not (d / "model_index.json").is_file():
        raise ConfigError(f"pipeline folder {str(d)!r} has no model_index.json; give OUT/pipeline of a distill run")
    try:
        idx = json.loads((d / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{str(d / 'model_index.json')!r} is not valid JSON; re-save the pipeline") from None
    cls = idx.get("_class_name") if isinstance(idx, dict) else None
    if cls not in PIPELINE_COMPONENTS:
        raise ConfigError(f"pipeline folder {str(d)!r} holds a {cls}, not an O2MKDPipeline; sample it with "
                          f"diffusers ({cls}.from_pretrained), or give OUT/pipeline of an o2mkd-ray distill run")
    for comp in PIPELINE_COMPONENTS[cls]:
        if not (d / comp).is_dir():
            raise ConfigError(f"pipeline folder {str(d)!r} has no {comp}/ folder; the save is incomplete, re-run "
                              "distill with the same --out to re-assemble it")
    unet = PIPELINE_COMPONENTS[cls][0]
    weights = sorted((d / unet).rglob("*.safetensors"))
    if not weights:
        raise ConfigError(f"pipeline folder {str(d)!r} has no student weights ({unet}/**/*.safetensors); re-run "
                          "distill with the same --out to re-assemble it")
    for f in weights:
        check_safetensors(f, "pipeline")
    sched = d / "scheduler" / "scheduler_config.json"
    try:
        return json.loads(sched.read_text()) if sched.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{str(sched)!r} is not valid JSON; re-save the pipeline") from None


def _sample(args) -> int:
    from .config import ConfigError, check_out_path, check_scheduler_name

    d = Path(args.pipeline_dir)
    if args.num_images < 1:
        raise ConfigError(f"--num-images: must be >= 1, got {args.num_images}")
    if args.steps < 1:
        raise ConfigError(f"--steps: must be >= 1, got {args.steps}")
    if not 0 <= args.eta <= 1:
        raise ConfigError(f"--eta: must be in [0, 1], got {args.eta}")
    sched_cfg = check_pipeline_dir(d)
    T = sched_cfg.get("num_train_timesteps")
    if isinstance(T, int) and args.steps > T:
        raise ConfigError(f"--steps: {args.steps} is more than the {T} training timesteps; use --steps <= {T}")
    out = Path(args.output or d.parent / "samples_cli.png")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--output {str(out)!r}: expected a .png path")
    if out.is_dir():
        raise ConfigError(f"--output {str(out)!r} is a folder; give a .png file path")
    check_out_path(out.parent, "--output")
    if not out.parent.is_dir():
        raise ConfigError(f"--output {str(out)!r}: folder {str(out.parent)!r} does not exist; create it first")
    if args.scheduler:
        check_scheduler_name(args.scheduler, "--scheduler")
    text = json.loads((d / "model_index.json").read_text())["_class_name"] == "O2MKDStableDiffusionPipeline"
    if text and not args.prompt:
        raise ConfigError("--prompt: this is a text-to-image pipeline; give at least one --prompt \"...\"")
    if not text and args.prompt:
        raise ConfigError("--prompt: this pipeline is unconditional; drop --prompt")
    if args.guidance_scale < 0:
        raise ConfigError(f"--guidance-scale: must be >= 0, got {args.guidance_scale}")

    import torch

    from .assemble import make_scheduler, save_grid
    from .pipeline import O2MKDPipeline
    from .sd_pipeline import O2MKDStableDiffusionPipeline

    from diffusers.utils import logging as dlogging

    dlogging.disable_progress_bar()  # stderr stays for errors
    if text:
        from transformers.utils import logging as tlogging

        tlogging.disable_progress_bar()
    try:
        pipe = (O2MKDStableDiffusionPipeline if text else O2MKDPipeline).from_pretrained(d)
    except (OSError, ValueError, KeyError, TypeError) as e:  # what diffusers raises on a damaged folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"pipeline folder {str(d)!r} cannot be loaded ({first}); re-run distill with the same "
                          "--out to re-assemble it") from None
    if args.scheduler and text:  # through the constructor, which normalises SD schedulers (clip_sample, offset)
        pipe = type(pipe)(**{**pipe.components, "scheduler": make_scheduler(args.scheduler, pipe.scheduler.config)})
    elif args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    if text:
        pipe.set_progress_bar_config(disable=True)
        from .sd_eval import sample_images

        rows = [sample_images(pipe, [p] * args.num_images, steps=args.steps, guidance_scale=args.guidance_scale,
                              seed=args.seed, negative_prompt=args.negative_prompt) for p in args.prompt]
        save_grid(rows, [f"{p!r}, guidance {args.guidance_scale}" for p in args.prompt], out,
                  title=f"{type(pipe.scheduler).__name__} {args.steps} steps")
    else:
        g = torch.Generator().manual_seed(args.seed)
        imgs = pipe(batch_size=args.num_images, generator=g, num_inference_steps=args.steps, eta=args.eta,
                    output_type="np").images
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
        from .analysis import run_analyze_cli
        from .evaluation import run_eval_cli
        from .tuning import run_tune_cli

        commands = {"distill": _distill, "sample": _sample, "teacher": _teacher, "eval": run_eval_cli,
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
    from .config import ConfigError

    if isinstance(e, ConfigError):
        return True
    distill = sys.modules.get("o2mkd_ray.distill")  # loaded whenever a CheckpointError can have been raised
    return distill is not None and isinstance(e, distill.CheckpointError)


if __name__ == "__main__":
    sys.exit(main())
