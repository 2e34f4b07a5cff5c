"""``train_loop_per_worker``: the only Ray-Train-aware training code.

Unpacks the config in its first lines, then drives the pure :class:`~o2mkd_ray.distill.distiller.SegmentDistiller`
(Ray Train V2: ``get_context``, ``get_checkpoint``, ``report`` with a ``Checkpoint`` every K steps).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch

log = logging.getLogger(__name__)


def restore_checkpoint(dist, ckpt, cfg) -> int:
    """Loads the latest reported checkpoint; on a bad one, warns and falls back to the newest good sibling."""
    from o2mkd_ray.errors import CheckpointError

    with ckpt.as_directory() as d:
        try:
            dist.load(d)
            return dist.step
        except (CheckpointError, OSError, RuntimeError, KeyError) as e:
            warnings.warn(f"checkpoint {d} is unusable ({e}); trying an earlier one")
            siblings = sorted(Path(d).parent.glob("checkpoint_*"), reverse=True)
            for s in siblings:
                if s.resolve() == Path(d).resolve():
                    continue
                try:
                    dist.load(s)
                    warnings.warn(f"resumed from earlier checkpoint {s.name} (step {dist.step})")
                    return dist.step
                except (CheckpointError, OSError, RuntimeError, KeyError):
                    continue
    warnings.warn("no usable checkpoint; starting this segment from its initial weights")
    return 0


def train_loop_per_worker(config: dict) -> dict:
    """Trains student ``config["segment"]`` on its timestep segment; one Ray Train worker of that segment."""
    entered = time.time()
    import diffusers
    from diffusers import DDPMScheduler

    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.teacher import LocalTeacher
    from o2mkd_ray.data.build import build_dataset
    from o2mkd_ray.data.images import infinite, make_loader
    from o2mkd_ray.distill.distiller import SegmentDistiller, fixed_val_batches
    from o2mkd_ray.engine.teacher_service import TeacherClient

    cfg = from_dict(config["cfg"])
    k: int = config["segment"]
    segments = Segments(config["boundaries"])
    scheduler = DDPMScheduler.from_config(config["scheduler_config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed + 1000 * k + rank)
    device = ray.train.torch.get_device()

    # the student's initial weights come from the driver through the object store (teacher-sliced or scratch)
    init = ray.get(config["student_init"][0])
    student = getattr(diffusers, init.get("class", "UNet2DModel")).from_config(init["config"])
    student.load_state_dict({n: torch.from_numpy(a.copy()) for n, a in init["state"].items()})

    if cfg.teacher.mode == "actor":
        teacher = TeacherClient(config["teacher_names"], seed=1000 * k + rank, client=f"seg-{k:02d}")
    else:
        from o2mkd_ray.core.teacher import TeacherFn, load_teacher

        model, _ = load_teacher(cfg.teacher)
        teacher = LocalTeacher(TeacherFn(model.to(device), config.get("feature_blocks")))

    wrap = (lambda m: ray.train.torch.prepare_model(m)) if world > 1 else None
    if config.get("cond_data"):  # text-to-image: the driver's cached latents + text embeddings
        from o2mkd_ray.data.cond_cache import cond_dataset

        dataset, uncond = cond_dataset(ray.get(config["cond_data"][0]))
    else:
        dataset, uncond = build_dataset(cfg.data), None
    dist = SegmentDistiller(cfg, k, segments, scheduler, student, config.get("teacher_channels"), wrap=wrap,
                            rank=rank, device=device, uncond=uncond)
    start_step = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        start_step = restore_checkpoint(dist, ckpt, cfg)

    per_worker = max(1, cfg.train.batch_size // world)
    loader = make_loader(dataset, per_worker, cfg.train.seed + k)
    if world > 1:
        loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)  # DistributedSampler per rank
    batches = infinite(loader)
    val = fixed_val_batches(dist, dataset, teacher, cfg.train.val_batches, per_worker)
    fault = cfg.debug
    progress = (config.get("progress") or [None])[0]  # a ray.util.queue.Queue owned by the driver, or None
    every = cfg.train.checkpoint_every

    def next_inputs():
        x_0, *rest = next(batches)
        x_t, t, eps = dist.make_inputs(x_0)
        cond = dist.make_cond(rest[0]) if rest else None  # (B, L, D) text embeddings, or None
        pending = teacher.submit(x_t, t, features=bool(dist.blocks), **({} if cond is None else {"cond": cond}))
        return x_t, t, eps, cond, pending

    t_train, n_samples, recent, history = 0.0, 0, [], []
    cur = next_inputs() if dist.step < cfg.train.steps else None
    while dist.step < cfg.train.steps:
        t0 = time.perf_counter()
        x_t, t, eps, cond, pending = cur
        cur = next_inputs() if dist.step + 1 < cfg.train.steps else None  # prefetch the next batch's targets
        eps_T, feats_T = teacher.result(pending)
        terms = dist.train_step(x_t, t, eps, eps_T, feats_T, cond)
        t_train += time.perf_counter() - t0
        n_samples += x_t.shape[0]
        recent.append(terms["loss"])
        _maybe_kill_worker(fault, k, rank, dist.step)
        if dist.step % every == 0 or dist.step == cfg.train.steps:
            metrics = {**terms, "step": dist.step, "segment": k, "loss_avg": sum(recent) / len(recent),
                       "val_loss": dist.val_loss(val), "samples_per_s": n_samples * world / max(t_train, 1e-9),
                       "teacher_latency_ms": 1000 * teacher.latency_s / max(1, teacher.calls),
                       "resumed_from": start_step, "time": time.time()}
            recent.clear()
            history.append(metrics)
            with tempfile.TemporaryDirectory() as tmp:
                checkpoint = None
                if rank == 0:
                    dist.save(Path(tmp) / "ckpt", extra={"metrics": {k2: v for k2, v in metrics.items()}})
                    checkpoint = ray.train.Checkpoint.from_directory(str(Path(tmp) / "ckpt"))
                ray.train.report(metrics, checkpoint=checkpoint)  # every rank reports the same number of times
            if rank == 0 and progress is not None:
                try:  # live metrics to the driver (MLflow, console, Tune); never fatal to training
                    progress.put_nowait({"segment": k, **metrics})
                except Exception as e:  # noqa: BLE001
                    log.warning("progress queue unavailable (%s); metrics stay in the checkpoint", e)
    return {"segment": k, "steps": dist.step, "resumed_from": start_step, "entered_at": entered, "started_at": entered,
            "finished_at": time.time(), "history": history}


def _maybe_kill_worker(fault: dict, k: int, rank: int, step: int) -> None:
    # test-only fault injection (debug.kill_worker = {segment, rank, step, marker}): rehearse a worker crash once
    spec = fault.get("kill_worker") if fault else None
    if not spec or spec.get("segment", 0) != k or spec.get("rank", 0) != rank or step != spec.get("step"):
        return
    marker = spec.get("marker")
    if marker and os.path.exists(marker):
        return
    if marker:
        Path(marker).write_text(str(step))
    log.warning("debug.kill_worker: killing worker of segment %d rank %d at step %d", k, rank, step)
    os._exit(1)
