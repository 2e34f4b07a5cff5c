"""The local engine: every segment one after another in this process, no Ray.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.background import BatchingSender
from o2mkd_ray.distill.checkpoints import MANIFEST
from o2mkd_ray.distill.run_folder import (
    finished_summary,
    prepare_run,
    run_dataset,
    save_segment,
    segment_summary,
)


def choose_checkpoint(select: str, ckdir: Path, history: list[dict]) -> tuple[Path, dict]:
    """The checkpoint ``train.select`` keeps among a segment's folders, and the metrics reported with it.

    Args:
        select: ``final`` (the newest) or ``best`` (the lowest ``val_loss``), as the Ray engine chooses.
        ckdir: the segment's ``checkpoint_NNNNNN`` folders (their manifests hold the reported metrics).
        history: this session's reports: the metrics of a checkpoint whose manifest has none.
    Returns:
        ``(folder, metrics)``.
    """
    found = []
    for d in sorted(ckdir.glob("checkpoint_*")):
        try:
            metrics = json.loads((d / MANIFEST).read_text()).get("metrics")
        except (OSError, json.JSONDecodeError):
            continue
        found.append((d, metrics or next((m for m in history if m["step"] == int(d.name.split("_")[-1])), {})))
    if not found:
        raise FileNotFoundError(f"no checkpoint in {ckdir}")
    if select == "best":
        return min(found, key=lambda dm: dm[1].get("val_loss", float("inf")))
    return found[-1]


def train_local(cfg: Config, out, progress: bool = True, on_report: Callable[[int, dict], None] | None = None,
                on_segments: Callable[[list[int]], None] | None = None) -> dict:
    """Trains every unfinished segment in turn into the run folder ``out``.

    Args:
        progress: a progress bar per segment.
        on_report: called as ``on_report(segment, metrics)`` at every report of every segment, and with the live
            metrics every ``train.log_every`` steps (``kind: "log"``; from a background thread, off the loop).
        on_segments: called with the boundaries once they are known.
    Returns:
        What the run-folder assembly needs: ``out``, ``teacher``, ``scheduler``, ``segments``, ``shape``,
        ``teacher_stats``, ``t_start``.
    """
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import LocalTeacher, TeacherFn
    from o2mkd_ray.distill.loop import run_segment

    t_start = time.time()
    out, teacher, scheduler, shape, segments = prepare_run(cfg, out, on_segments)
    fn = TeacherFn(teacher, cfg.kd.feature_blocks)
    channels = fn.feature_channels(shape) if cfg.kd.lambda_feat > 0 else {}
    lt = LocalTeacher(fn)
    dataset, uncond = run_dataset(cfg, out, teacher, scheduler, lt)
    students = build_students(cfg, teacher, segments.n)
    live = BatchingSender(lambda items: [on_report(int(m["segment"]), m) for m in items]) if on_report else None
    try:
        for k in range(segments.n):
            if finished_summary(out, k) is not None:
                continue
            ckdir = out / "local" / f"seg-{k:02d}"
            res = run_segment(cfg, k, segments, scheduler, students[k], lt, channels, dataset, ckpt_dir=ckdir,
                              progress=progress, on_report=(lambda m, k=k: on_report(k, m)) if on_report else None,
                              uncond=uncond, on_log=live.send if live else None)
            chosen, metrics = choose_checkpoint(cfg.train.select, ckdir, res["history"])
            save_segment(out, k, chosen, segment_summary(k, segments, res, metrics, str(chosen)))
    finally:
        if live is not None:
            live.close()
    stats = {"mode": "local", "replicas": 0, "requests": lt.calls, "mean_batch": 1.0, "busy_s": lt.latency_s}
    return {"out": out, "teacher": teacher, "scheduler": scheduler, "segments": segments, "shape": shape,
            "teacher_stats": stats, "t_start": t_start}
