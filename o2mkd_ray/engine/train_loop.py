"""``train_loop_per_worker``: the Ray Train adapter of the one training loop (:func:`o2mkd_ray.distill.loop.run`).

It unpacks its config, builds the distiller, resumes from ``ray.train.get_checkpoint()``, and gives the loop an
``on_report`` that reports to Ray Train (rank 0 with a checkpoint) and to the driver's progress queue.

Every rank also records its reports in ``rank-R.json`` in its segment's Ray Train folder
(``OUT/ray/seg-KK``, local storage only): ``rank``, ``world_size``, and per report ``step``, ``pid``, the Ray
``node_id`` and ``node_ip`` it ran on, ``param_digest`` (:func:`param_digest` of the student), ``kd_digest`` (of
the KD loss's feature adapters, which are averaged over the ranks beside DDP) and, on a GPU,
``gpu_peak_mb``. Only rank 0's metrics reach the driver, so this is where the other ranks of a data-parallel
segment can be seen: the same digest on every rank at a step shows that the ranks hold the same weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import ray
import ray.train
import ray.train.torch
import torch

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.atomic import write_json
from o2mkd_ray.core.background import BatchingSender
from o2mkd_ray.distill.checkpoints import restore_checkpoint
from o2mkd_ray.distill.distiller import SegmentDistiller

log = logging.getLogger(__name__)

# restore_checkpoint: its home before distill/
__all__ = ["param_digest", "train_loop_per_worker"]


def train_loop_per_worker(config: dict) -> dict:
    """Trains student ``config["segment"]`` on its timestep segment; one Ray Train worker of that segment.

    Args:
        config: the driver's ``train_loop_config`` (``o2mkd_ray.engine.trainers.loop_configs``).
    Returns:
        The loop's summary (``o2mkd_ray.distill.loop.run``) with ``segment`` and the time this function was entered.
    """
    entered = time.time()
    from diffusers import DDPMScheduler

    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.distill.distiller import fixed_val_batches
    from o2mkd_ray.distill.loop import run, segment_batches
    from o2mkd_ray.engine.faults import worker_hook
    from o2mkd_ray.engine.placement import node_of_this_process

    cfg, k = from_dict(config["cfg"]), config["segment"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed + 1000 * k + rank)
    device = ray.train.torch.get_device()
    dataset, uncond = _dataset(cfg, config)
    teacher = _teacher(cfg, config, k, rank, device)
    scheduler = DDPMScheduler.from_config(config["scheduler_config"])
    dist = SegmentDistiller(cfg, k, Segments(config["boundaries"]), scheduler, _student(config),
                            config.get("teacher_channels"), wrap=ray.train.torch.prepare_model if world > 1 else None,
                            rank=rank, device=device, uncond=uncond)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        restore_checkpoint(dist, ckpt)
    per_worker = max(1, cfg.train.batch_size // world)
    # more than one worker: a DistributedSampler per rank
    prepare = (lambda loader: ray.train.torch.prepare_data_loader(loader, move_to_device=False)) if world > 1 else None
    batches = segment_batches(cfg, k, dataset, per_worker, prepare)
    val = fixed_val_batches(dist, dataset, teacher, cfg.train.val_batches, per_worker)
    queue = (config.get("progress") or [None])[0]
    report = _reporter(dist, rank, world, queue, _rank_ledger(rank, world))
    # live metrics every train.log_every steps: rank 0 hands them to a sender thread (a deque append in the loop)
    live = BatchingSender(queue.put_nowait_batch) if rank == 0 and queue is not None else None
    try:
        res = run(dist, batches, teacher, val, report, world=world, after_step=worker_hook(cfg.debug, k, rank),
                  on_log=live.send if live else None)
    finally:
        if live is not None:
            live.close()
    return {**res, "segment": k, "entered_at": entered, "started_at": entered, "loop_started_at": res["started_at"],
            **node_of_this_process()}


def _student(config: dict) -> torch.nn.Module:
    # the student's initial weights come from the driver through the object store (teacher-sliced or scratch)
    import diffusers

    init = ray.get(config["student_init"][0])
    student = getattr(diffusers, init.get("class", "UNet2DModel")).from_config(init["config"])
    student.load_state_dict({n: torch.from_numpy(a.copy()) for n, a in init["state"].items()})
    return student


def _teacher(cfg: Config, config: dict, k: int, rank: int, device):
    from o2mkd_ray.core.teacher import LocalTeacher, TeacherFn, compute_dtype, load_teacher
    from o2mkd_ray.engine.teacher_service import TeacherClient

    if cfg.teacher.mode == "actor":
        return TeacherClient(config["teacher_names"], seed=1000 * k + rank, client=f"seg-{k:02d}",
                             replica_nodes=config.get("teacher_nodes"))
    model, _ = load_teacher(cfg.teacher)
    # teacher.dtype (bf16/fp16) on a GPU, as the teacher actors do
    fn = TeacherFn(model.to(device), config.get("feature_blocks"), dtype=compute_dtype(cfg.teacher, device))
    return LocalTeacher(fn)


def _dataset(cfg: Config, config: dict):
    if config.get("cond_data"):  # conditional: the driver's cached latents + text embeddings / class labels
        from o2mkd_ray.data.cond_cache import cond_dataset

        return cond_dataset(ray.get(config["cond_data"][0]))
    from o2mkd_ray.data.build import build_dataset

    return build_dataset(cfg.data), None


def param_digest(module: torch.nn.Module, samples: int = 256) -> str:
    """A cheap fingerprint of a module's parameters: sha256 over each parameter's name and about ``samples``
    evenly strided values (as float32). Equal weights give equal digests; a DDP wrapper is looked through."""
    module = getattr(module, "module", module)
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // samples)
        h.update(name.encode())
        h.update(flat[::stride].to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _rank_ledger(rank: int, world: int) -> Callable[[dict], None] | None:
    """``rank-R.json`` in this segment's Ray Train folder (local storage only; None elsewhere):
    ``record(metrics)`` appends one report to it, atomically. A restarted worker keeps the earlier
    attempts' reports."""
    try:
        storage = ray.train.get_context().get_storage()  # a Ray DeveloperAPI: without it there is no ledger
        if storage.storage_filesystem.type_name != "local":
            return None
        path = Path(storage.experiment_fs_path) / f"rank-{rank}.json"
    except Exception as e:  # noqa: BLE001 - diagnostics only, never fatal to training
        log.debug("no rank ledger (%s)", e)
        return None
    from o2mkd_ray.engine.placement import node_of_this_process

    where = node_of_this_process()
    reports: list[dict] = []
    try:
        reports = list(json.loads(path.read_text()).get("reports", []))
    except (OSError, ValueError, AttributeError):
        pass

    def record(metrics: dict) -> None:
        keys = ("step", "param_digest", "kd_digest", "resumed_from", "time", "gpu_peak_mb")
        reports.append({key: metrics.get(key) for key in keys} | {"pid": os.getpid(), **where})
        try:
            write_json(path, {"rank": rank, "world_size": world, "reports": reports})
        except OSError as e:
            log.warning("rank ledger %s not written (%s)", path, e)

    return record


def _reporter(dist: SegmentDistiller, rank: int, world: int, queue,
              ledger: Callable[[dict], None] | None = None) -> Callable[[dict], None]:
    """The loop's ``on_report``: ``ray.train.report`` on every rank (rank 0 with the checkpoint
    folder; the metrics plus this rank's ``rank``, ``world_size`` and ``param_digest``), the same to
    ``ledger`` (:func:`_rank_ledger`), then rank 0's metrics to the driver's progress queue (``queue``:
    a ``ray.util.queue.Queue``, or None)."""
    def report(metrics: dict) -> None:
        mine = {**metrics, "rank": rank, "world_size": world, "param_digest": param_digest(dist.student),
                "kd_digest": param_digest(dist.kd)}  # the feature adapters, trained beside the student
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                dist.save(Path(tmp) / "ckpt", extra={"metrics": metrics})
                checkpoint = ray.train.Checkpoint.from_directory(str(Path(tmp) / "ckpt"))
            ray.train.report(mine, checkpoint=checkpoint)  # every rank reports the same number of times
        if ledger is not None:
            ledger(mine)
        if rank == 0 and queue is not None:
            try:  # live metrics to the driver (MLflow, console, Tune); never fatal to training
                queue.put_nowait(metrics)
            except Exception as e:  # noqa: BLE001
                log.warning("progress queue unavailable (%s); metrics stay in the checkpoint", e)

    return report
