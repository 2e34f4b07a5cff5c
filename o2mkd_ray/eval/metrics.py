"""Teacher agreement per timestep, trajectory fidelity, latency: plain torch/diffusers, no Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from o2mkd_ray.core.schedulers import make_scheduler
from o2mkd_ray.core.segments import Segments
from o2mkd_ray.core.teacher import eps_of
from o2mkd_ray.eval.fid import FID_SEED_OFFSET
from o2mkd_ray.eval.sampling import student_images, teacher_images

PSNR_CAP_DB = 100.0  # PSNR of identical images (MSE 0) is +inf; reported as this cap


@torch.no_grad()
def teacher_agreement(multi, teacher_fn: Callable, scheduler, dataset, segments=None, num_samples: int = 256,
                      num_buckets: int = 20, seed: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """Student-vs-teacher ε error as a function of t, on the training forward process.

    ``x_0`` are drawn from ``dataset`` with a fixed generator (the dataset has no held-out split, but the
    noise and timesteps are fresh draws, and the distillation target is the teacher's output, not ``x_0``);
    ``t`` is a jittered grid over ``[0, T)`` (one t per stretch of ``T/num_samples`` timesteps);
    ``x_t = add_noise(x_0, ε, t)``.

    Args:
        multi: a :class:`MultiStudentUNet` (routes each sample to the student owning its t).
        teacher_fn: ``teacher_fn(x_t, t) -> (eps, feats)`` (a :class:`~o2mkd_ray.core.teacher.TeacherFn`), or a
            model.
        scheduler: the teacher's training noise scheduler (``add_noise``).
        dataset: items ``(x_0,)`` with ``x_0: (C, H, W)``.
        segments: :class:`Segments` or boundaries; default ``multi.segments``.
        num_samples: number of ``(x_0, ε, t)`` draws.
        num_buckets: equal-width timestep buckets over ``[0, T)``.
        seed: generator seed.
        batch_size: forward batch.
    Returns:
        One row per (bucket ∩ segment): ``t_lo, t_hi`` (t_lo <= t < t_hi), ``segment``, ``n``, ``mse``
        (student vs teacher ε, mean over samples and pixels), ``teacher_task_mse`` (teacher vs the true ε, for
        scale).
        :func:`segment_summary` reduces it per segment.
    """
    if segments is None:
        segments = multi.segments
    elif not isinstance(segments, Segments):
        segments = Segments(segments)
    T = segments.num_train_timesteps
    p = next(multi.parameters())
    g = torch.Generator().manual_seed(FID_SEED_OFFSET + seed)
    order = torch.randperm(len(dataset), generator=g)
    idx = order.repeat(math.ceil(num_samples / len(dataset)))[:num_samples]
    # jittered grid: every stretch of T/num_samples timesteps gets exactly one sample
    u = torch.rand(num_samples, generator=g, dtype=torch.float64)
    t = ((torch.arange(num_samples, dtype=torch.float64) + u) * T / num_samples).floor().long()
    t = t.clamp(0, T - 1)
    mse, task = [], []
    for s in range(0, num_samples, batch_size):
        x_0 = torch.stack([dataset[int(i)][0] for i in idx[s:s + batch_size]])  # (B, C, H, W)
        t_b = t[s:s + batch_size]
        eps = torch.randn(x_0.shape, generator=g)
        x_t = scheduler.add_noise(x_0, eps, t_b)
        eps_S = multi(x_t.to(p.device, p.dtype), t_b.to(p.device)).sample.float().cpu()
        eps_T = eps_of(teacher_fn(x_t.to(p.device), t_b.to(p.device))).float().cpu()
        mse.append(((eps_S - eps_T) ** 2).flatten(1).mean(1))
        task.append(((eps_T - eps) ** 2).flatten(1).mean(1))
    df = pd.DataFrame({"t": t.numpy(), "segment": segments.owner(t).numpy(),
                       "bucket": (t * num_buckets // T).numpy(),
                       "mse": torch.cat(mse).double().numpy(), "task": torch.cat(task).double().numpy()})
    rows = []
    for (b, k), grp in df.groupby(["bucket", "segment"], sort=True):
        lo, hi = segments.range(int(k))
        # bucket b holds ceil(b T / nb) <= t < ceil((b + 1) T / nb), matching t * nb // T == b
        b_lo, b_hi = -(-int(b) * T // num_buckets), -(-(int(b) + 1) * T // num_buckets)
        rows.append({"t_lo": max(lo, b_lo), "t_hi": min(hi, b_hi), "segment": int(k), "n": len(grp),
                     "mse": float(grp["mse"].mean()), "teacher_task_mse": float(grp["task"].mean())})
    return pd.DataFrame(rows).sort_values("t_lo", ignore_index=True)


def segment_summary(agreement: pd.DataFrame) -> pd.DataFrame:
    """Per-segment rows (``segment, t_lo, t_hi, n, mse, teacher_task_mse``) from :func:`teacher_agreement`."""
    rows = []
    for k, grp in agreement.groupby("segment", sort=True):
        w = grp["n"] / grp["n"].sum()
        rows.append({"segment": int(k), "t_lo": int(grp["t_lo"].min()), "t_hi": int(grp["t_hi"].max()),
                     "n": int(grp["n"].sum()), "mse": float((grp["mse"] * w).sum()),
                     "teacher_task_mse": float((grp["teacher_task_mse"] * w).sum())})
    return pd.DataFrame(rows)


def pipe_sample_shape(pipe) -> tuple[int, int, int]:
    cfg = pipe.students.config
    size = cfg.sample_size
    return (cfg.in_channels, *((size, size) if isinstance(size, int) else tuple(size)))


@contextlib.contextmanager
def _scheduler(pipe, scheduler):
    old = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield pipe
    finally:
        pipe.scheduler = old


def trajectory_fidelity(teacher_model: nn.Module, pipe, steps: int, num_images: int, seed: int, value_range,
                        scheduler_config=None, psnr_cap_db: float = PSNR_CAP_DB) -> dict:
    """Teacher and O2MKD sampled from the same initial noise with deterministic DDIM (eta=0) at ``steps``.

    Args:
        teacher_model: the teacher ε-network.
        pipe: an :class:`O2MKDPipeline` (its scheduler is swapped for DDIM during the call, then restored).
        steps: DDIM steps for both.
        num_images: images (= per-sample comparisons).
        seed: noise seed (both draw the same ``(N, C, H, W)`` noise from it).
        value_range: the data range, mapped to [0, 1] before comparing.
        scheduler_config: the noise schedule for DDIM; default ``pipe.scheduler.config``.
        psnr_cap_db: PSNR reported for MSE == 0 (and the ceiling for all samples).
    Returns:
        ``per_sample`` (DataFrame: sample, mse, psnr_db, capped), ``mse_mean``, ``mse_max``, ``psnr_mean_db``,
        ``psnr_min_db``, ``psnr_cap_db``, ``num_capped``, and the images ``teacher_images`` / ``o2mkd_images``
        (``(N, H, W, C)`` in [0, 1]).
    """
    base = scheduler_config if scheduler_config is not None else pipe.scheduler.config
    t_img = teacher_images(teacher_model, make_scheduler("ddim", base), pipe_sample_shape(pipe), value_range,
                           num_images, steps, seed, eta=0.0)
    with _scheduler(pipe, make_scheduler("ddim", base)):
        s_img = student_images(pipe, num_images, steps, seed, eta=0.0)
    mse = ((t_img.astype(np.float64) - s_img.astype(np.float64)) ** 2).reshape(num_images, -1).mean(1)
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10.0 * np.log10(1.0 / np.maximum(mse, 1e-300)), np.inf)  # peak 1.0 in [0, 1]
    capped = psnr >= psnr_cap_db
    psnr = np.minimum(psnr, psnr_cap_db)
    per = pd.DataFrame({"sample": np.arange(num_images), "mse": mse, "psnr_db": psnr, "capped": capped})
    return {"per_sample": per, "mse_mean": float(mse.mean()), "mse_max": float(mse.max()),
            "psnr_mean_db": float(psnr.mean()), "psnr_min_db": float(psnr.min()),
            "psnr_cap_db": float(psnr_cap_db),
            "num_capped": int(capped.sum()), "teacher_images": t_img, "o2mkd_images": s_img}


def cost_report(teacher_model: nn.Module, multi, steps: int, scheduler_config, shape) -> dict:
    """Params and MACs per step of the teacher and each student, and for a whole DDIM sampling run per image.

    A run of ``steps`` steps costs ``Σ_t MACs(owner(t))`` for O2MKD (each step on the student owning its t)
    against ``steps × MACs(teacher)``. MACs via :func:`o2mkd_ray.core.costs.count_macs` at batch 1.
    """
    from o2mkd_ray.core.costs import count_macs, count_params

    sched = make_scheduler("ddim", scheduler_config)
    sched.set_timesteps(steps)
    owners = [multi.segments.owner(int(t)) for t in sched.timesteps]
    t_macs = int(count_macs(teacher_model, (1, *shape)))
    t_params = int(count_params(teacher_model))
    students = []
    for k in range(multi.num_students):
        lo, hi = multi.segments.range(k)
        s = multi.student(k)
        macs = int(count_macs(s, (1, *shape)))
        n = owners.count(k)
        students.append({"segment": k, "t_lo": lo, "t_hi": hi, "params": int(count_params(s)),
                         "macs_per_step": macs, "steps_in_run": n, "macs_in_run": macs * n})
    run = sum(s["macs_in_run"] for s in students)
    total = sum(s["params"] for s in students)
    return {
        "steps": steps,
        "teacher": {"params": t_params, "macs_per_step": t_macs, "macs_per_run": t_macs * steps},
        "students": students,
        "o2mkd": {"params_total": total, "params_max_student": max(s["params"] for s in students),
                  "macs_per_run": run, "mean_macs_per_step": run / max(1, steps)},
        "macs_ratio_run": run / max(1, t_macs * steps),  # O2MKD / teacher, same steps
        "params_ratio_max_student": max(s["params"] for s in students) / max(1, t_params),  # held per step
        "params_ratio_total": total / max(1, t_params),  # held in memory for a whole run
    }


def latency(teacher_model: nn.Module, pipe, steps: int, batch: int, value_range, scheduler_config=None,
            repeats: int = 3, seed: int = 0) -> dict:
    """Wall-clock seconds of one DDIM sampling run, teacher vs O2MKD, same steps and batch; median of
    ``repeats`` interleaved runs after one warm-up each. ``speedup`` = teacher / O2MKD."""
    base = scheduler_config if scheduler_config is not None else pipe.scheduler.config
    shape = pipe_sample_shape(pipe)
    sync = torch.cuda.synchronize if next(teacher_model.parameters()).is_cuda else (lambda: None)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def run_teacher():
        teacher_images(teacher_model, make_scheduler("ddim", base), shape, value_range, batch, steps, seed)

    def run_o2mkd():
        student_images(pipe, batch, steps, seed)

    with _scheduler(pipe, make_scheduler("ddim", base)):
        run_teacher(), run_o2mkd()  # warm-up
        t_runs, s_runs = [], []
        for _ in range(max(1, repeats)):
            t_runs.append(timed(run_teacher))
            s_runs.append(timed(run_o2mkd))
    t_med, s_med = float(np.median(t_runs)), float(np.median(s_runs))
    return {"steps": steps, "batch": batch, "repeats": len(t_runs), "teacher_s": t_med, "o2mkd_s": s_med,
            "speedup": t_med / s_med if s_med > 0 else None, "teacher_runs_s": t_runs, "o2mkd_runs_s": s_runs,
            "device": str(next(teacher_model.parameters()).device), "torch_threads": torch.get_num_threads()}
