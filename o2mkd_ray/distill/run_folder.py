"""The run folder both engines train into: ``config.json``, the teacher it names, ``segments/seg-KK`` (the chosen
EMA student and its summary per finished segment) and the text-to-image data cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Callable

from o2mkd_ray.config.checks import CONDITIONAL_KINDS, TEXT_TO_IMAGE_KINDS
from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.atomic import replace_dir, write_json, write_text
from o2mkd_ray.core.segments import Segments

log = logging.getLogger(__name__)


# keys added after runs were saved, with their defaults: (section, key, default)
NEW_KEYS = (("students", "transformer_layers_per_block", None), ("students", "depth", None),
            ("data", "synth_samples", 64))


def run_hash(d: dict) -> str:
    # what makes two runs "the same run" (resumable into one --out): everything but runtime placement / tracking
    keep = {k: v for k, v in d.items() if k not in ("ray", "mlflow", "eval", "debug", "sampling")}
    if isinstance(keep.get("train"), dict):  # how often live metrics are sent changes nothing trained
        keep["train"] = {k: v for k, v in keep["train"].items() if k != "log_every"}
    # keys added after runs were saved count only when set to another value than their default, so those runs'
    # folders keep resuming
    for section, key, default in NEW_KEYS:
        if isinstance(keep.get(section), dict) and keep[section].get(key, default) == default:
            keep[section] = {k: v for k, v in keep[section].items() if k != key}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def finished_summary(out: Path, k: int) -> dict | None:
    """The summary of segment ``k`` when it is finished (``OUT/segments/seg-KK/summary.json``), else None."""
    f = out / "segments" / f"seg-{k:02d}" / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def segment_summary(k: int, segments: Segments, run: dict, metrics: dict, checkpoint: str | None,
                    **extra) -> dict:
    """What ``summary.json`` and report.json's ``segments[k]`` say about a finished segment, for both engines.

    Args:
        run: the training loop's summary (``o2mkd_ray.distill.loop.run``: times, ``resumed_from``, ``history``).
        metrics: the metrics reported with the chosen checkpoint (``train.select``).
        checkpoint: where the chosen checkpoint is.
        extra: engine-specific fields (the Ray engine's fit and worker times).
    Returns:
        ``index``, ``boundaries``, ``started_at``, ``finished_at``, ``steps``, ``resumed_from``, ``final_loss``,
        ``val_loss``, ``samples_per_s``, ``checkpoint``, ``history`` and ``extra``.
    """
    return {"index": k, "boundaries": list(segments.range(k)), "started_at": run["started_at"],
            "finished_at": run["finished_at"], "steps": int(metrics.get("step", run.get("steps", 0))),
            "resumed_from": run.get("resumed_from", 0), "final_loss": metrics.get("loss_avg"),
            "val_loss": metrics.get("val_loss"), "samples_per_s": metrics.get("samples_per_s"),
            "checkpoint": checkpoint, "history": run.get("history", []), **extra}


def save_segment(out: Path, k: int, ckpt_dir: Path, summary: dict) -> None:
    """Copies the chosen checkpoint's EMA student into OUT/segments/seg-kk (atomic) and writes its summary."""
    with replace_dir(out / "segments" / f"seg-{k:02d}") as tmp:
        shutil.copytree(ckpt_dir / "ema", tmp / "ema")
        write_json(tmp / "summary.json", summary)


def prepare_run(cfg: Config, out, on_segments: Callable[[list[int]], None] | None = None):
    """Both engines' start: OUT/config.json, the teacher and its scheduler, input shape, segments.

    Args:
        on_segments: called with the boundaries once they are known (the tracker records them).
    """
    from o2mkd_ray.core.teacher import load_teacher, sample_shape

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.json", cfg.to_json())
    teacher, scheduler = load_teacher(cfg.teacher)
    shape = sample_shape(teacher, cfg.data.channels, cfg.data.resolution)
    segments = Segments.from_config(cfg.segments, scheduler.config.num_train_timesteps)
    if on_segments is not None:
        on_segments(list(segments.boundaries))
    return out, teacher, scheduler, shape, segments


def is_text_to_image(cfg: Config) -> bool:
    from o2mkd_ray.core.teacher import teacher_kind

    return teacher_kind(cfg.teacher) in TEXT_TO_IMAGE_KINDS


def is_conditional(cfg: Config) -> bool:
    """True for teachers whose training data carries a condition per sample (text-to-image, class-conditional)."""
    from o2mkd_ray.core.teacher import teacher_kind

    return teacher_kind(cfg.teacher) in CONDITIONAL_KINDS


def load_cond_data(cfg: Config, out: Path | None, teacher, scheduler, teacher_fn) -> dict:
    """Conditional runs: cached latents + conditions (OUT/cache; not cached when ``out`` is None), synthesised by
    ``teacher_fn`` if needed (None: the teacher in-process): caption embeddings for text-to-image teachers
    (:func:`~o2mkd_ray.data.cond_cache.build_cond_data`), class labels for DiT
    (:func:`~o2mkd_ray.data.class_data.build_class_data`)."""
    from o2mkd_ray.data.cond_cache import build_cond_data

    t0 = time.time()
    cache_dir = Path(out) / "cache" if out is not None else None
    if not is_text_to_image(cfg):
        from o2mkd_ray.data.class_data import build_class_data

        cond = build_class_data(cfg, teacher, dict(scheduler.config), teacher_fn, cache_dir,
                                log=lambda m: log.warning("%s", m))
        log.warning("class-conditional data: latents %s of %d classes (%.1f s)", tuple(cond["latents"].shape),
                    len(set(cond["class_labels"].tolist())), time.time() - t0)
        return cond
    cond = build_cond_data(cfg, teacher, dict(scheduler.config), teacher=teacher_fn, cache_dir=cache_dir,
                           log=lambda m: log.warning("%s", m))
    log.warning("text-to-image data: %d captions, latents %s, embeddings %s (%.1f s)", len(cond["prompts"]),
                tuple(cond["latents"].shape), tuple(cond["embeds"].shape), time.time() - t0)
    return cond


def run_dataset(cfg: Config, out: Path | None, teacher, scheduler, teacher_fn=None):
    """The data students are distilled on, for every teacher kind: ``(dataset, uncond)``.

    Unconditional teachers: the config's dataset (items ``(x_0,)``) and None. Text-to-image teachers: the caption
    latents with their conditioning (items ``(x_0, cond)``, :func:`~o2mkd_ray.data.cond_cache.cond_dataset`) from
    :func:`load_cond_data`, and the empty prompt's conditioning; DiT teachers: class-labelled latents (items
    ``(x_0, label)``) and the null class. Everything that feeds a teacher the run's data
    (the local engine, tune's objectives, the feature analysis) takes it from here, so a new text-to-image kind
    plugs in through its cached conditioning, not through each caller.

    Args:
        out: the run folder holding the text-to-image cache (None: not cached); teacher_fn: see
            :func:`load_cond_data`.
    """
    if is_conditional(cfg):
        from o2mkd_ray.data.cond_cache import cond_dataset

        return cond_dataset(load_cond_data(cfg, out, teacher, scheduler, teacher_fn))
    from o2mkd_ray.data.build import build_dataset

    return build_dataset(cfg.data), None
