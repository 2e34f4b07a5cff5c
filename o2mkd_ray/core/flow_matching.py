"""Training inputs of flow-matching teachers (SD3's ``FlowMatchEulerDiscreteScheduler``) for one timestep segment.

The time axis is the scheduler's own: ``t = T * sigma`` with ``T = num_train_timesteps``, where sampling visits the
shifted sigmas ``shift * s / (1 + (shift - 1) * s)`` of evenly spaced ``s`` in ``[s_min, 1]`` (diffusers' ``set_timesteps``
ends its grid at ``s_min = shift(1 / T)``, the shifted smallest training sigma). Training draws a
segment's ``t`` from that same distribution restricted to the segment: ``s`` uniform between the unshifted images of
the segment's ends, then shifted (exact, no rejection, and each segment gets its own draws however narrow it is under
the shift). The forward process is diffusers' ``scale_noise``: ``x_t = (1 - sigma) * x_0 + sigma * eps``, and the
model predicts the velocity ``eps - x_0``.

Not wired into the engines yet: these are the pieces a flow-matching ``SegmentDistiller`` needs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from o2mkd_ray.errors import ConfigError


def _shift_of(scheduler_config: Mapping) -> float:
    if scheduler_config.get("use_dynamic_shifting"):
        raise ConfigError("teacher: a flow-matching scheduler with use_dynamic_shifting depends on the image size; "
                          "only a fixed shift is supported (scheduler_config.json: use_dynamic_shifting=false)")
    return float(scheduler_config.get("shift", 1.0))


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's shift of sigmas in [0, 1] (monotone increasing; identity for ``shift = 1``)."""
    return shift * s / (1 + (shift - 1) * s)


def unshift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """The inverse of :func:`shift_sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def sample_segment_t(scheduler_config: Mapping, lo: float, hi: float, n: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` training timesteps in ``[lo, hi)`` from the scheduler's shifted sigma distribution (module docstring).

    Args:
        scheduler_config: the teacher's ``FlowMatchEulerDiscreteScheduler`` config (``num_train_timesteps``,
            ``shift``).
        lo, hi: the segment's ends on the ``[0, T]`` axis.
    Returns:
        ``(n,)`` float64 timesteps.
    """
    T = float(scheduler_config.get("num_train_timesteps", 1000))
    shift = _shift_of(scheduler_config)
    if not 0 <= lo < hi <= T:
        raise ConfigError(f"segments: a segment [{lo}, {hi}) must lie inside [0, {T:g}]")
    u_lo, u_hi = (unshift_sigma(torch.tensor(v / T, dtype=torch.float64), shift) for v in (lo, hi))
    u_min = shift_sigma(torch.tensor(1 / T, dtype=torch.float64), shift)  # where the sampler's grid ends
    if u_min < u_hi:  # a segment wholly below it (a few timesteps at most) keeps its whole range
        u_lo = torch.maximum(u_lo, u_min)
    u = u_lo + (u_hi - u_lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    t = shift_sigma(u, shift) * T
    below_hi = torch.nextafter(torch.tensor(float(hi), dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    return t.clamp(max=below_hi)  # [lo, hi): rounding never lands on the next segment's first timestep


def flow_inputs(x_0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, num_train_timesteps: int = 1000):
    """``(x_t, velocity)`` for timesteps ``t`` ``(B,)``: ``x_t = (1 - sigma) x_0 + sigma eps`` with
    ``sigma = t / T`` (diffusers' ``scale_noise``), and the target ``eps - x_0``."""
    sigma = (t.double() / num_train_timesteps).to(x_0.dtype).view(-1, *([1] * (x_0.dim() - 1)))
    return (1 - sigma) * x_0 + sigma * eps, eps - x_0
