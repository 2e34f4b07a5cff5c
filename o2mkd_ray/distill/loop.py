"""The one training loop of a segment, shared by the local engine and the Ray Train workers.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.segments import Segments
from o2mkd_ray.distill.distiller import SegmentDistiller, TeacherCallable, fixed_val_batches


def run_segment(cfg: Config, k: int, segments: Segments, scheduler, student: nn.Module, teacher: TeacherCallable,
                teacher_channels: dict | None, dataset, ckpt_dir: str | Path | None = None,
                on_report: Callable[[dict], None] | None = None, progress: bool = False,
                uncond: torch.Tensor | None = None) -> dict:
    """The plain single-process training loop for segment k (no Ray).

    Args:
        teacher: ``teacher(x_t, t, features) -> (eps_T, feats_T)``.
        ckpt_dir: where to write ``checkpoint_NNNNNN`` folders every ``train.checkpoint_every`` steps (optional).
        on_report: called with the metrics dict every ``checkpoint_every`` steps.
    Returns:
        A summary: steps, final_loss, val_loss, samples_per_s, started_at, finished_at, history.
    """
    from tqdm.auto import tqdm

    from o2mkd_ray.data.images import infinite, make_loader

    dist = SegmentDistiller(cfg, k, segments, scheduler, student, teacher_channels, uncond=uncond)
    loader = infinite(make_loader(dataset, cfg.train.batch_size, cfg.train.seed + k))
    val = fixed_val_batches(dist, dataset, teacher, cfg.train.val_batches, cfg.train.batch_size)
    started, history, recent = time.time(), [], []
    t_train = 0.0
    bar = tqdm(total=cfg.train.steps, desc=f"seg-{k:02d}", disable=not progress)
    while dist.step < cfg.train.steps:
        t0 = time.perf_counter()
        x_0, *rest = next(loader)
        x_t, t, eps = dist.make_inputs(x_0)
        cond = dist.make_cond(rest[0]) if rest else None  # (B, L, D) text embeddings, or None
        eps_T, feats_T = teacher(x_t, t, features=bool(dist.blocks), **({} if cond is None else {"cond": cond}))
        terms = dist.train_step(x_t, t, eps, eps_T, feats_T, cond)
        t_train += time.perf_counter() - t0
        recent.append(terms["loss"])
        bar.update(1)
        if dist.step % cfg.train.checkpoint_every == 0 or dist.step == cfg.train.steps:
            m = {**terms, "step": dist.step, "loss_avg": sum(recent) / len(recent), "val_loss": dist.val_loss(val),
                 "samples_per_s": dist.step * x_0.shape[0] / max(t_train, 1e-9)}
            recent.clear()
            history.append(m)
            if ckpt_dir is not None:
                dist.save(Path(ckpt_dir) / f"checkpoint_{dist.step:06d}")
            if on_report:
                on_report(m)
    bar.close()
    if not history:
        warnings.warn(f"segment {k}: no steps were run")
    last = history[-1] if history else {}
    return {"steps": dist.step, "final_loss": last.get("loss_avg"), "val_loss": last.get("val_loss"),
            "samples_per_s": last.get("samples_per_s"), "started_at": started, "finished_at": time.time(),
            "history": history, "distiller": dist}
