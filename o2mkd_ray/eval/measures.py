"""Measurements both evaluations share: image fidelity (MSE/PSNR with a cap), teacher-vs-students latency, the
cost table of a sampling run (from :mod:`o2mkd_ray.core.costs`), and the stopwatch of the report's timings.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import torch

from o2mkd_ray.core.costs import forward_cost, sampling_cost

PSNR_CAP_DB = 100.0  # PSNR of identical images (MSE 0) is +inf; reported as this cap


class Stopwatch:
    """Seconds of each phase of an evaluation, for the report's ``timings_s``."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self._t0 = self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Records the seconds since the previous lap (or the start) as ``name``."""
        now = time.perf_counter()
        self.timings[name] = round(now - self._last, 3)
        self._last = now

    def total(self) -> float:
        """Seconds since the start."""
        return time.perf_counter() - self._t0


def sample_shape_of(unet_config) -> tuple[int, int, int]:
    """``(C, H, W)`` of a UNet's inputs from its config (``in_channels``, ``sample_size`` int or pair)."""
    size = unet_config.sample_size
    return (unet_config.in_channels, *((size, size) if isinstance(size, int) else tuple(size)))


def image_fidelity(reference: np.ndarray, images: np.ndarray, psnr_cap_db: float = PSNR_CAP_DB) -> dict:
    """Per-image MSE and PSNR of ``images`` against ``reference`` (both ``(N, H, W, C)`` in [0, 1], peak 1).

    Args:
        reference: the teacher's images.
        images: the students' images, same shape.
        psnr_cap_db: PSNR reported for MSE == 0, and the ceiling for every image.
    Returns:
        ``mse``, ``psnr_db``, ``capped`` (arrays of N), ``mse_mean``, ``mse_max``, ``psnr_mean_db``,
        ``psnr_min_db``, ``psnr_cap_db``, ``num_capped``.
    """
    n = len(reference)
    mse = ((reference.astype(np.float64) - images.astype(np.float64)) ** 2).reshape(n, -1).mean(1)
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10.0 * np.log10(1.0 / np.maximum(mse, 1e-300)), np.inf)
    capped = psnr >= psnr_cap_db
    psnr = np.minimum(psnr, psnr_cap_db)
    return {"mse": mse, "psnr_db": psnr, "capped": capped, "mse_mean": float(mse.mean()),
            "mse_max": float(mse.max()), "psnr_mean_db": float(psnr.mean()), "psnr_min_db": float(psnr.min()),
            "psnr_cap_db": float(psnr_cap_db), "num_capped": int(capped.sum())}


def paired_latency(run_teacher: Callable[[], object], run_o2mkd: Callable[[], object], repeats: int, *,
                   cuda: bool, warmup: bool = True, per: int = 1, unit: str = "s") -> dict:
    """Wall-clock seconds of the teacher and the students, median of ``repeats`` interleaved runs (so both see
    the same machine load), each run divided by ``per`` (e.g. images per run).

    Args:
        run_teacher, run_o2mkd: one sampling run each.
        repeats: timed runs per side (at least 1).
        cuda: synchronise CUDA around each run (kernels run asynchronously).
        warmup: one untimed run of each first.
        per: divisor of every run's seconds.
        unit: suffix of the median keys (``s``: seconds per run; e.g. ``s_per_image`` with ``per`` images).
    Returns:
        ``repeats``, ``teacher_<unit>``, ``o2mkd_<unit>`` (medians), ``speedup`` (teacher / O2MKD; None when
        O2MKD measured 0 s), ``teacher_runs_s``, ``o2mkd_runs_s`` (each divided by ``per``), ``torch_threads``.
    """
    sync = torch.cuda.synchronize if cuda and torch.cuda.is_available() else (lambda: None)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) / per

    if warmup:
        run_teacher(), run_o2mkd()
    t_runs, s_runs = [], []
    for _ in range(max(1, repeats)):
        t_runs.append(timed(run_teacher))
        s_runs.append(timed(run_o2mkd))
    t_med, s_med = float(np.median(t_runs)), float(np.median(s_runs))
    return {"repeats": len(t_runs), f"teacher_{unit}": t_med, f"o2mkd_{unit}": s_med,
            "speedup": t_med / s_med if s_med > 0 else None, "teacher_runs_s": t_runs, "o2mkd_runs_s": s_runs,
            "torch_threads": torch.get_num_threads()}


def cost_table(teacher, students: Sequence, boundaries: Sequence[int], timesteps: Sequence[int], shape, *,
               steps: int, passes: int = 1, seq_len: int = 77) -> dict:
    """The report's ``cost``: params and MACs per forward of the teacher and each student, and MACs of one
    sampling run per image on ``timesteps`` (:func:`o2mkd_ray.core.costs.sampling_cost`).

    Args:
        teacher: the teacher UNet.
        students: the student UNets, segment order.
        boundaries: segment boundaries ``[0, ..., T]``.
        timesteps: one entry per UNet call of the run (:func:`o2mkd_ray.core.costs.sampler_timesteps`).
        shape: the UNet input ``(C, H, W)``.
        steps: ``num_inference_steps`` of the run.
        passes: UNet passes per call (2 with classifier-free guidance).
        seq_len: text tokens of a text-conditioned UNet.
    Returns:
        ``steps``, ``unet_calls_per_image``, ``unet_batch_per_image``, ``teacher`` (params, macs_per_step,
        macs_per_run), ``students`` (one row each), ``o2mkd`` (totals), ``macs_ratio_run`` and the params ratios.
    """
    t = forward_cost(teacher, shape, seq_len)
    s = [forward_cost(m, shape, seq_len) for m in students]
    run = sampling_cost([c["macs"] for c in s], t["macs"], boundaries, timesteps, passes)
    rows = [{"segment": k, "t_lo": int(boundaries[k]), "t_hi": int(boundaries[k + 1]), "params": c["params"],
             "macs_per_step": c["macs"], "steps_in_run": run["steps_per_student"][k],
             "macs_in_run": run["student_macs_per_run"][k]} for k, c in enumerate(s)]
    params = [c["params"] for c in s]
    return {
        "steps": steps, "unet_calls_per_image": run["unet_calls"], "unet_batch_per_image": passes,
        "teacher": {"params": t["params"], "macs_per_step": t["macs"],
                    "macs_per_run": run["teacher_macs_per_run"]},
        "students": rows,
        "o2mkd": {"params_total": sum(params), "params_max_student": max(params),
                  "macs_per_run": run["o2mkd_macs_per_run"],
                  "mean_macs_per_step": run["o2mkd_macs_per_run"] / max(1, run["unet_calls"] * passes)},
        "macs_ratio_run": run["macs_ratio"],  # O2MKD / teacher, same timesteps
        "params_ratio_max_student": max(params) / max(1, t["params"]),  # held per step
        "params_ratio_total": sum(params) / max(1, t["params"]),  # held in memory for a whole run
    }
