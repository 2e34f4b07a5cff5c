"""Training inputs of flow-matching teachers (SD3's ``FlowMatchEulerDiscreteScheduler``) for one timestep segment.

The time axis is the scheduler's own: ``t = T * sigma`` with ``T = num_train_timesteps``, where sampling visits the
shifted sigmas ``shift * s / (1 + (shift - 1) * s)`` of evenly spaced ``s`` in ``[s_min, 1]`` (diffusers' ``set_timesteps``
ends its grid at ``s_min = shift(1 / T)``, the shifted smallest training sigma). Training draws a
segment's ``t`` from that same distribution restricted to the segment: ``s`` uniform between the unshifted images of
the segment's ends, then shifted (exact, no rejection, and each segment gets its own draws however narrow it is under
the shift). The forward process is diffusers' ``scale_noise``: ``x_t = (1 - sigma) * x_0 + sigma * eps``, and the
model predicts the velocity ``eps - x_0``.

:class:`FlowMatchTraining` puts these behind the training-scheduler interface the distiller, the evaluation and
the teacher loader already use for DDPM-style teachers (``config``, ``add_noise``, a task target), plus the
segment's own timestep draw (:func:`draw_segment_t`), so a flow-matching teacher goes through the same code.
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


def is_flow_config(scheduler_config: Mapping) -> bool:
    """True for a flow-matching scheduler's config (``FlowMatchEulerDiscreteScheduler`` and its kin)."""
    return str(scheduler_config.get("_class_name", "")).startswith("FlowMatch")


def synthesis_scheduler(scheduler_config: Mapping):
    """The sampler for the teacher's own samples (data-free latents): DDIM on a DDPM-style schedule, the
    flow-matching Euler sampler on a flow-matching one (both diffusers')."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if is_flow_config(scheduler_config):
        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    return DDIMScheduler.from_config(scheduler_config)


class FlowMatchTraining:
    """The training side of a flow-matching teacher's scheduler, with the DDPM schedulers' training interface.

    ``add_noise(x_0, eps, t)`` is diffusers' ``scale_noise`` at ``sigma = t / T`` for any float t (the diffusers
    scheduler only looks up t among its sampling timesteps), :func:`~o2mkd_ray.core.targets.task_target` reads
    ``flow_matching`` and gives the velocity ``eps - x_0``, and :meth:`sample_t` draws a segment's t from the
    scheduler's shifted distribution (:func:`sample_segment_t`).

    Args:
        scheduler: the teacher's ``FlowMatchEulerDiscreteScheduler`` (its config: ``num_train_timesteps``,
            ``shift``; ``use_dynamic_shifting`` refused).
    """

    flow_matching = True

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.config = scheduler.config
        _shift_of(self.config)  # a dynamic shift is refused here, before any training

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    def add_noise(self, x_0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = (1 - t / T) x_0 + (t / T) eps``."""
        return flow_inputs(x_0, eps, t, self.num_train_timesteps)[0]

    def velocity(self, x_0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """The flow-matching target ``eps - x_0``."""
        return eps - x_0

    def sample_t(self, lo: float, hi: float, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n,)`` float32 training timesteps in ``[lo, hi)`` (:func:`sample_segment_t`; the float32 rounding
        is clamped too, so no draw lands on ``hi``, the next segment's first timestep)."""
        t = sample_segment_t(self.config, lo, hi, n, generator).float()
        below_hi = torch.nextafter(torch.tensor(float(hi)), torch.tensor(0.0))
        return torch.maximum(t.clamp(max=below_hi), torch.tensor(float(lo)))


def draw_segment_t(scheduler, segments, k: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Segment ``k``'s training timesteps ``(n,)``: the scheduler's own distribution restricted to the segment for
    a flow-matching teacher (:class:`FlowMatchTraining`), else uniform integers (:meth:`Segments.sample_t`)."""
    if getattr(scheduler, "flow_matching", False):
        lo, hi = segments.range(k)
        return scheduler.sample_t(lo, hi, n, generator)
    return segments.sample_t(k, n, generator=generator)
