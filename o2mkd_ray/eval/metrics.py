"""Teacher agreement per timestep, trajectory fidelity and latency of unconditional runs: plain torch/diffusers,
no Ray or MLflow.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from o2mkd_ray.core.conditioning import call_denoiser, cond_kwargs
from o2mkd_ray.core.schedulers import make_scheduler
from o2mkd_ray.core.segments import Segments
from o2mkd_ray.core.targets import task_target
from o2mkd_ray.core.teacher import batch_cond, eps_of
from o2mkd_ray.eval.fid import FID_SEED_OFFSET
from o2mkd_ray.eval.measures import PSNR_CAP_DB, image_fidelity, paired_latency, sample_shape_of
from o2mkd_ray.eval.sampling import sampling_state, student_images, teacher_images

__all__ = ["latency", "pipe_sample_shape", "segment_summary", "teacher_agreement",
           "trajectory_fidelity"]


@torch.no_grad()
def teacher_agreement(multi, teacher_fn: Callable, scheduler, dataset, segments=None, num_samples: int = 256,
                      num_buckets: int = 20, seed: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """Student-vs-teacher output error as a function of t, on the training forward process.

    A little over 60 lines, most of them this docstring: the sampling, the forwards and the bucketing read best
    together.

    Outputs are compared raw, in the teacher's parameterisation (ε, v or x_0: ``scheduler.config.prediction_type``).

    ``x_0`` are drawn from ``dataset`` with a fixed generator (the dataset has no held-out split, but the
    noise and timesteps are fresh draws, and the distillation target is the teacher's output, not ``x_0``);
    ``t`` is a jittered grid over ``[0, T)`` (one t per stretch of ``T/num_samples`` timesteps);
    ``x_t = add_noise(x_0, ε, t)``.

    Args:
        multi: a :class:`MultiStudentUNet` (routes each sample to the student owning its t).
        teacher_fn: ``teacher_fn(x_t, t) -> (eps, feats)`` (a :class:`~o2mkd_ray.core.teacher.TeacherFn`), or a
            model; with a conditioned dataset it is called as the students are, with the conditioning's UNet
            kwargs (:func:`~o2mkd_ray.core.teacher.cond_kwargs`), so pass the teacher model.
        scheduler: the teacher's training noise scheduler (``add_noise``, ``prediction_type``).
        dataset: items ``(x_0,)`` with ``x_0: (C, H, W)``, or ``(x_0, cond)`` for a text-to-image teacher (the
            caption latents and their conditioning, :func:`~o2mkd_ray.distill.run_folder.run_dataset`): teacher
            and students then see each x_0's own caption.
        segments: :class:`Segments` or boundaries; default ``multi.segments``.
        num_samples: number of ``(x_0, ε, t)`` draws.
        num_buckets: equal-width timestep buckets over ``[0, T)``.
        seed: generator seed.
        batch_size: forward batch.
    Returns:
        One row per (bucket ∩ segment): ``t_lo, t_hi`` (t_lo <= t < t_hi), ``segment``, ``n``, ``mse``
        (student vs teacher output, mean over samples and pixels), ``teacher_task_mse`` (teacher vs the ground
        truth of its parameterisation, :func:`~o2mkd_ray.core.targets.task_target`: the true ε, v or x_0; for
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
        items = [dataset[int(i)] for i in idx[s:s + batch_size]]
        x_0 = torch.stack([it[0] for it in items])  # (B, C, H, W)
        kw = cond_kwargs(batch_cond(items), p.device)  # {} for unconditional items
        t_b = t[s:s + batch_size]
        eps = torch.randn(x_0.shape, generator=g)
        x_t = scheduler.add_noise(x_0, eps, t_b)
        eps_S = call_denoiser(multi, x_t.to(p.device, p.dtype), t_b.to(p.device), **kw).sample.float().cpu()
        eps_T = eps_of(call_denoiser(teacher_fn, x_t.to(p.device), t_b.to(p.device), **kw)).float().cpu()
        mse.append(((eps_S - eps_T) ** 2).flatten(1).mean(1))
        target = task_target(scheduler, x_0, eps, t_b)  # a learned-sigma output (DiT) carries it first
        task.append(((eps_T[:, :target.shape[1]] - target) ** 2).flatten(1).mean(1))
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
    """``(C, H, W)`` of the students' inputs in an :class:`O2MKDPipeline`."""
    return sample_shape_of(pipe.students.config)


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
    with sampling_state(pipe, make_scheduler("ddim", base)):
        s_img = student_images(pipe, num_images, steps, seed, eta=0.0)
    fid = image_fidelity(t_img, s_img, psnr_cap_db)
    per = pd.DataFrame({"sample": np.arange(num_images), "mse": fid.pop("mse"), "psnr_db": fid.pop("psnr_db"),
                        "capped": fid.pop("capped")})
    return {"per_sample": per, **fid, "teacher_images": t_img, "o2mkd_images": s_img}


def latency(teacher_model: nn.Module, pipe, steps: int, batch: int, value_range, scheduler_config=None,
            repeats: int = 3, seed: int = 0) -> dict:
    """Wall-clock seconds of one DDIM sampling run of ``batch`` images, teacher vs O2MKD, same steps; median of
    ``repeats`` interleaved runs after one warm-up each (:func:`o2mkd_ray.eval.measures.paired_latency`).

    Returns:
        ``steps``, ``batch``, ``device`` and :func:`~o2mkd_ray.eval.measures.paired_latency`'s fields;
        ``speedup`` = teacher / O2MKD.
    """
    base = scheduler_config if scheduler_config is not None else pipe.scheduler.config
    shape = pipe_sample_shape(pipe)
    device = next(teacher_model.parameters()).device

    def run_teacher():
        teacher_images(teacher_model, make_scheduler("ddim", base), shape, value_range, batch, steps, seed)

    with sampling_state(pipe, make_scheduler("ddim", base)):
        lat = paired_latency(run_teacher, lambda: student_images(pipe, batch, steps, seed), repeats,
                             cuda=device.type == "cuda")
    return {"steps": steps, "batch": batch, **lat, "device": str(device)}
