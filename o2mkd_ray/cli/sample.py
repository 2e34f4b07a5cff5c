"""``o2mkd-ray sample PIPELINE``: sample a saved pipeline folder.
"""

from __future__ import annotations

import json
from pathlib import Path

# pipeline class -> its folders (the students' folder first)
PIPELINE_COMPONENTS = {"O2MKDPipeline": ("students", "scheduler"),
                       "O2MKDStableDiffusionPipeline": ("unet", "scheduler", "vae", "text_encoder", "tokenizer"),
                       "O2MKDStableDiffusionXLPipeline": ("unet", "scheduler", "vae", "text_encoder", "tokenizer",
                                                          "text_encoder_2", "tokenizer_2"),
                       "O2MKDDiTPipeline": ("transformer", "scheduler", "vae"),
                       "O2MKDStableDiffusion3Pipeline": ("transformer", "scheduler", "vae", "text_encoder", "tokenizer",
                                                         "text_encoder_2", "tokenizer_2")}


def check_pipeline_dir(d: Path) -> dict:
    """A saved O2MKD pipeline folder: model_index.json of the right class, its components, intact weights.

    Returns:
        The scheduler config (for range checks on ``--steps``).
    """
    from o2mkd_ray.core.teacher_checks import check_safetensors
    from o2mkd_ray.errors import ConfigError

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


def sample_command(args) -> int:
    """``o2mkd-ray sample``: checks every argument first, then loads the pipeline and writes the grid PNG."""
    d, out, kind = _checked_args(args)
    pipe = _load(d, kind == "text", args.scheduler)
    _write_grid(pipe, args, out, kind)
    print(str(out))
    return 0


def _checked_args(args) -> tuple[Path, Path, str]:
    """The pipeline folder, the output PNG and the pipeline's kind (``unconditional``, ``text`` or ``class``);
    ConfigError on bad input."""
    from o2mkd_ray.config.checks import check_out_path
    from o2mkd_ray.core.schedulers import check_scheduler_name
    from o2mkd_ray.errors import ConfigError

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
    cls = json.loads((d / "model_index.json").read_text())["_class_name"]
    _check_class_labels(d, cls, getattr(args, "class_label", None))
    text = cls not in ("O2MKDPipeline", "O2MKDDiTPipeline")
    if text:
        from o2mkd_ray.core.sd import require_text_to_image_extra

        require_text_to_image_extra("pipeline")
    if text and not args.prompt:
        raise ConfigError("--prompt: this is a text-to-image pipeline; give at least one --prompt \"...\"")
    if not text and args.prompt:
        raise ConfigError("--prompt: this pipeline is unconditional; drop --prompt")
    if args.guidance_scale < 0:
        raise ConfigError(f"--guidance-scale: must be >= 0, got {args.guidance_scale}")
    return d, out, "text" if text else "class" if cls == "O2MKDDiTPipeline" else "unconditional"


def _check_class_labels(d: Path, cls: str, labels: list[int] | None) -> None:
    """A DiT pipeline needs ``--class-label`` ids its students embed; other pipelines take none."""
    from o2mkd_ray.errors import ConfigError

    if cls != "O2MKDDiTPipeline":
        if labels:
            raise ConfigError("--class-label: only class-conditional (DiT) pipelines take class labels; drop it")
        return
    if not labels:
        raise ConfigError("--class-label: this is a class-conditional (DiT) pipeline; give at least one "
                          "--class-label ID")
    try:
        n = json.loads((d / "transformer" / "config.json").read_text()).get("num_embeds_ada_norm")
    except (OSError, ValueError):
        n = None
    bad = [k for k in labels if k < 0 or (isinstance(n, int) and k >= n)]
    if bad:
        raise ConfigError(f"--class-label: {bad[0]} is not a class of this pipeline; give ids in 0..{n - 1}")


def _load(d: Path, text: bool, scheduler: str | None):
    """The saved pipeline, with ``scheduler`` swapped in when given. The text-to-image pipeline (and with it
    transformers) is imported only for a text-to-image folder."""
    from diffusers.utils import logging as dlogging

    from o2mkd_ray.core.schedulers import make_scheduler
    from o2mkd_ray.errors import ConfigError

    dlogging.disable_progress_bar()  # stderr stays for errors
    from o2mkd_ray.pipelines.build import saved_pipeline_class

    if text:
        from transformers.utils import logging as tlogging

        tlogging.disable_progress_bar()
    cls = saved_pipeline_class(d)
    try:
        pipe = cls.from_pretrained(d)
    except (OSError, ValueError, KeyError, TypeError) as e:  # what diffusers raises on a damaged folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"pipeline folder {str(d)!r} cannot be loaded ({first}); re-run distill with the same "
                          "--out to re-assemble it") from None
    if scheduler and text:  # through the constructor, which normalises SD schedulers (clip_sample, offset)
        pipe = type(pipe)(**{**pipe.components, "scheduler": make_scheduler(scheduler, pipe.scheduler.config)})
    elif scheduler:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    return pipe


def _write_grid(pipe, args, out: Path, kind: str) -> None:
    """Samples ``--num-images`` images (one row per ``--prompt`` for text-to-image, per ``--class-label`` for
    DiT) into one PNG grid."""
    import torch

    from o2mkd_ray.eval.sampling import sample_images, save_grid

    if kind == "class":
        pipe.set_progress_bar_config(disable=True)
        rows = [pipe(class_labels=[c] * args.num_images, guidance_scale=args.guidance_scale,
                     generator=torch.Generator().manual_seed(args.seed), num_inference_steps=args.steps,
                     output_type="np").images for c in args.class_label]
        save_grid(rows, [f"class {c}, guidance {args.guidance_scale}" for c in args.class_label], out,
                  title=f"{type(pipe.scheduler).__name__} {args.steps} steps")
    elif kind == "text":
        pipe.set_progress_bar_config(disable=True)
        rows = [sample_images(pipe, [p] * args.num_images, steps=args.steps, guidance_scale=args.guidance_scale,
                              seed=args.seed, negative_prompt=args.negative_prompt) for p in args.prompt]
        save_grid(rows, [f"{p!r}, guidance {args.guidance_scale}" for p in args.prompt], out,
                  title=f"{type(pipe.scheduler).__name__} {args.steps} steps")
    else:
        g = torch.Generator().manual_seed(args.seed)
        imgs = pipe(batch_size=args.num_images, generator=g, num_inference_steps=args.steps, eta=args.eta,
                    output_type="np").images
        save_grid([imgs], [f"{type(pipe.scheduler).__name__} {args.steps} steps"], out)
