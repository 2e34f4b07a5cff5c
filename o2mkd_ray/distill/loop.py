"""The one training loop of a segment, shared by the local engine and the Ray Train workers.

:func:`run` owns batching, the teacher prefetch, metrics and the per-report history; an engine gives it an
``on_report`` callback for its side effects (checkpoints, ``ray.train.report``, trackers, progress queues).
:func:`run_segment` is the local engine's use of it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.conditioning import from_items
from o2mkd_ray.core.segments import Segments
from o2mkd_ray.distill.checkpoints import checkpoint_name, restore_checkpoint
from o2mkd_ray.distill.distiller import SegmentDistiller, TeacherCallable, fixed_val_batches


def segment_batches(cfg: Config, k: int, dataset, batch_size: int,
                    prepare: Callable | None = None) -> Iterator[tuple]:
    """Endless shuffled batches of segment ``k`` (seed ``train.seed + k``).

    Args:
        batch_size: samples per batch of this process (a Ray worker: its share of ``train.batch_size``).
        prepare: optional wrapper of the DataLoader (Ray's ``prepare_data_loader``: a sampler per rank).
    Returns:
        An iterator of ``(x_0,)`` or ``(x_0, cond)`` batches.
    """
    from o2mkd_ray.data.images import infinite, make_loader

    loader = make_loader(dataset, batch_size, cfg.train.seed + k)
    return infinite(prepare(loader) if prepare else loader)


def _next_inputs(dist: SegmentDistiller, batches: Iterator[tuple], teacher):
    x_0, *rest = next(batches)
    x_t, t, eps = dist.make_inputs(x_0)
    cond = dist.make_cond(from_items(rest))  # text embeddings (B, L, D) (+ SDXL's added conditions), or None
    pending = teacher.submit(x_t, t, features=bool(dist.blocks), **({} if cond is None else {"cond": cond}))
    return x_t, t, eps, cond, pending


def run(dist: SegmentDistiller, batches: Iterator[tuple], teacher, val_batches: list[tuple],
        on_report: Callable[[dict], None], world: int = 1, after_step: Callable[[int], None] | None = None,
        progress: bool = False, on_log: Callable[[dict], None] | None = None) -> dict:
    """Trains ``dist`` from its current step to its segment's ``train.steps`` budget, reporting every
    ``train.checkpoint_every`` steps and streaming live metrics every ``train.log_every`` steps.

    The teacher's targets for the next batch are requested (``teacher.submit``) before the student steps on the
    current one, so a remote teacher computes them meanwhile; ``teacher.result`` collects them.

    Args:
        batches: endless ``(x_0[, cond])`` batches (:func:`segment_batches`).
        teacher: ``submit(x_t, t, features, cond) -> pending`` and ``result(pending) -> (eps_T, feats_T)``, with
            ``latency_s`` and ``calls`` counters (``LocalTeacher`` or ``TeacherClient``).
        val_batches: held-out batches for ``val_loss`` (:func:`fixed_val_batches`).
        on_report: called with the metrics of each report (``step``, ``segment``, ``loss_avg``, ``val_loss``,
            ``samples_per_s``, ``teacher_latency_ms``, ``teacher_wait_share`` (the share of the steps' time spent
            waiting for the teacher's targets), ``resumed_from``, ``time`` and the loss terms; on a GPU also
            ``gpu_peak_mb``, this process's peak CUDA memory).
        world: data-parallel processes training this segment, each with the same batch size: samples/s counts all.
        after_step: called with the step number after every step (fault drills).
        progress: a progress bar.
        on_log: called every ``train.log_every`` steps between reports with the last step's loss terms, ``lr``,
            ``grad_norm``, ``samples_per_s``, ``step``, ``segment``, ``time`` and ``kind: "log"``; it must return
            at once (:class:`o2mkd_ray.core.background.BatchingSender.send`), since it runs in the training loop.
    Returns:
        ``steps``, ``resumed_from``, ``started_at``, ``finished_at``, ``history`` (the reported metrics), ``train_s``
        (the steps' time), ``teacher_wait_s`` (its part spent waiting for the teacher) and ``teacher_wait_share``.
    """
    from tqdm.auto import tqdm

    steps, every = dist.steps, dist.cfg.train.checkpoint_every
    log_every = dist.cfg.train.log_every if on_log is not None else 0
    resumed_from, started = dist.step, time.time()
    history, recent, t_train, t_wait, n_samples = [], [], 0.0, 0.0, 0
    bar = tqdm(total=steps, initial=dist.step, desc=f"seg-{dist.k:02d}", disable=not progress)
    cur = _next_inputs(dist, batches, teacher) if dist.step < steps else None
    while dist.step < steps:
        t0 = time.perf_counter()
        x_t, t, eps, cond, pending = cur
        cur = _next_inputs(dist, batches, teacher) if dist.step + 1 < steps else None  # prefetch
        t_asked = time.perf_counter()
        eps_T, feats_T = teacher.result(pending)  # the time spent here is this step's wait on the teacher
        t_wait += time.perf_counter() - t_asked
        terms = dist.train_step(x_t, t, eps, eps_T, feats_T, cond)
        t_train += time.perf_counter() - t0
        n_samples += x_t.shape[0] * world
        recent.append(terms["loss"])
        bar.update(1)
        if after_step is not None:
            after_step(dist.step)
        if log_every and dist.step % log_every == 0 and dist.step % every and dist.step != steps:
            on_log({**terms, "step": dist.step, "segment": dist.k, "samples_per_s": n_samples / max(t_train, 1e-9),
                    "time": time.time(), "kind": "log"})
        if dist.step % every == 0 or dist.step == steps:
            metrics = {**terms, "step": dist.step, "segment": dist.k, "loss_avg": sum(recent) / len(recent),
                       "val_loss": dist.val_loss(val_batches), "samples_per_s": n_samples / max(t_train, 1e-9),
                       "teacher_latency_ms": 1000 * teacher.latency_s / max(1, teacher.calls),
                       "teacher_wait_share": t_wait / max(t_train, 1e-9),
                       "resumed_from": resumed_from, "time": time.time(), **_gpu_memory(dist.device)}
            recent.clear()
            history.append(metrics)
            on_report(metrics)
    bar.close()
    return {"steps": dist.step, "resumed_from": resumed_from, "started_at": started, "finished_at": time.time(),
            "history": history, "train_s": t_train, "teacher_wait_s": t_wait,
            "teacher_wait_share": t_wait / t_train if t_train > 0 else None}


def _gpu_memory(device: torch.device) -> dict:
    """``gpu_peak_mb``: this process's peak CUDA memory allocated by torch so far (``{}`` off a GPU), so that
    runs sharing a GPU (fractional GPUs) show what each process needs."""
    if device.type != "cuda":
        return {}
    return {"gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def run_segment(cfg: Config, k: int, segments: Segments, scheduler, student: nn.Module, teacher: TeacherCallable,
                teacher_channels: dict | None, dataset, ckpt_dir: str | Path | None = None,
                on_report: Callable[[dict], None] | None = None, progress: bool = False,
                uncond: torch.Tensor | None = None, on_log: Callable[[dict], None] | None = None) -> dict:
    """Segment ``k`` in this process (the local engine): :func:`run` with checkpoints in ``ckpt_dir``.

    Args:
        teacher: an in-process teacher with ``submit``/``result`` (``o2mkd_ray.core.teacher.LocalTeacher``).
        ckpt_dir: where to write ``checkpoint_NNNNNN`` folders at every report; the newest usable one there is
            resumed from.
        on_report: called with the metrics of every report, after its checkpoint is written.
    Returns:
        :func:`run`'s summary and ``distiller``.
    """
    dist = SegmentDistiller(cfg, k, segments, scheduler, student, teacher_channels, uncond=uncond)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else None
    saved = sorted(ckpt_dir.glob("checkpoint_*")) if ckpt_dir is not None and ckpt_dir.is_dir() else []
    if saved:
        restore_checkpoint(dist, saved[-1])
    val = fixed_val_batches(dist, dataset, teacher, cfg.train.val_batches, cfg.train.batch_size)

    def report(metrics: dict) -> None:
        if ckpt_dir is not None:
            dist.save(ckpt_dir / checkpoint_name(dist.step), extra={"metrics": metrics})
        if on_report is not None:
            on_report(metrics)

    batches = segment_batches(cfg, k, dataset, cfg.train.batch_size)
    return {**run(dist, batches, teacher, val, report, progress=progress, on_log=on_log), "distiller": dist}
