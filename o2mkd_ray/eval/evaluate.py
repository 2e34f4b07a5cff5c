"""``evaluate_run(OUT)``: the evaluation of a distill run, unconditional (:mod:`o2mkd_ray.eval.unconditional`) or
text-to-image (:mod:`o2mkd_ray.eval.text_to_image`), written to ``OUT/eval/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from o2mkd_ray.core.teacher import teacher_kind
from o2mkd_ray.distill.run_folder import is_text_to_image
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.eval.fid import REFERENCE_IMAGES
from o2mkd_ray.eval.text_to_image import evaluate_sd_run
from o2mkd_ray.eval.unconditional import Options, evaluate_unconditional

__all__ = ["evaluate_run"]


def _check_run_folder(out) -> Path:
    if out is None or str(out) == "":
        raise ConfigError("eval: give the run folder, e.g. `o2mkd-ray eval runs/digits`")
    p = Path(out).expanduser()
    if not p.exists():
        raise ConfigError(f"eval: run folder {str(p)!r} does not exist; give the --out folder of a distill "
                          "run")
    if not p.is_dir():
        raise ConfigError(f"eval: {str(p)!r} is a file; give the --out folder of a distill run")
    missing = [n for n in ("config.json", "pipeline/model_index.json") if not (p / n).is_file()]
    if missing:
        raise ConfigError(f"eval: {str(p)!r} is not a finished o2mkd-ray run folder (no "
                          f"{', '.join(missing)}); give the --out folder of a completed "
                          "`o2mkd-ray distill` run")
    return p.resolve()


def _run_config(out: Path):
    from o2mkd_ray.config.loading import from_dict

    try:
        return from_dict(json.loads((out / "config.json").read_text()))
    except json.JSONDecodeError:
        raise ConfigError(f"eval: {str(out / 'config.json')!r} is not valid JSON; is this a distill "
                          "run?") from None


def evaluate_run(out, num_images: int | None = None, steps: int | None = None, *,
                 agreement_samples: int = 256, num_buckets: int = 20, num_reference: int = REFERENCE_IMAGES,
                 latency_repeats: int = 3, device: str | None = None) -> dict:
    """Evaluates a distill run folder and writes ``OUT/eval/``.

    Unconditional runs: teacher agreement per timestep, trajectory fidelity, FID/KID vs data and teacher, cost,
    latency (``report.json``, ``report.md``, plots). Text-to-image runs: :func:`evaluate_sd` on the run's
    prompts (``report.json``, ``metrics.json``, ``samples.png``). DiT runs: agreement with the teacher on held-out
    class labels (trained vs untrained students), pixel error, cost
    (:func:`~o2mkd_ray.eval.class_conditional.evaluate_dit_run`).

    Args:
        out: the run folder (``config.json``, ``pipeline/``).
        num_images: generated images per model (default ``eval.num_images``); also the latency batch.
        steps: sampling steps (default ``eval.steps``).
        agreement_samples, num_buckets: see :func:`~o2mkd_ray.eval.metrics.teacher_agreement`.
        num_reference: dataset images for the FID/KID reference.
        latency_repeats: timed runs per model.
        device: default CUDA when available, else CPU.
    Returns:
        The report (as written to ``OUT/eval/report.json``), with ``files`` (written paths) and ``metrics``
        (flat ``{name: float}`` of the headline numbers, for experiment tracking).
    Raises:
        ConfigError: OUT missing or not a run folder, or bad ``num_images``/``steps``.
    """
    out = _check_run_folder(out)
    cfg = _run_config(out)
    n = num_images if num_images is not None else cfg.eval.num_images
    steps = steps if steps is not None else cfg.eval.steps
    for key, v in (("--num-images", n), ("--steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"eval {key}: must be an integer >= 1, got {v!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if teacher_kind(cfg.teacher) == "dit":
        from o2mkd_ray.eval.class_conditional import evaluate_dit_run

        return evaluate_dit_run(out, cfg, n, steps, agreement_samples=min(agreement_samples, 64),
                                latency_repeats=latency_repeats, device=dev)
    if is_text_to_image(cfg):
        return evaluate_sd_run(out, cfg, n, steps, latency_repeats=latency_repeats, device=dev)
    opt = Options(num_images=n, steps=steps, agreement_samples=agreement_samples, num_buckets=num_buckets,
                  num_reference=num_reference, latency_repeats=latency_repeats)
    return evaluate_unconditional(out, cfg, opt, dev)
