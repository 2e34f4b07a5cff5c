"""What a diffusion model's output means: its parameterisation (``scheduler.config.prediction_type``) and the task
target a student of it learns.

Students learn the teacher's raw output in the teacher's own parameterisation, so output KD compares raw outputs
whatever it is; only the task loss needs the ground truth in that parameterisation:

* ``epsilon``: the noise ε added to x_0;
* ``v_prediction``: v = √ᾱ_t·ε − √(1−ᾱ_t)·x_0 (Salimans & Ho 2022, as diffusers' ``get_velocity``);
* ``sample``: x_0 itself;
* flow matching (SD3, :class:`o2mkd_ray.core.flow_matching.FlowMatchTraining`): the velocity ε − x_0.
"""

from __future__ import annotations

import torch

from o2mkd_ray.errors import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_type(scheduler) -> str:
    """The parameterisation of a scheduler's model (``config.prediction_type``; diffusers' default ``epsilon``)."""
    return getattr(scheduler.config, "prediction_type", None) or "epsilon"


def check_prediction_type(pred: str, where: str) -> None:
    """Raises a one-line ConfigError unless ``pred`` is a parameterisation O2MKD can distil.

    Args:
        pred: a ``prediction_type`` value.
        where: the file or factory it came from, for the message.
    """
    if pred not in PREDICTION_TYPES:
        raise ConfigError(f"teacher: unknown prediction_type {pred!r} ({where}); use one of "
                          f"{', '.join(PREDICTION_TYPES)}")


def task_target(scheduler, x_0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The ground truth of the teacher's parameterisation for ``x_t = scheduler.add_noise(x_0, eps, t)``.

    Args:
        scheduler: the teacher's training noise scheduler (its ``prediction_type`` and ``alphas_cumprod``).
        x_0: clean samples ``(B, C, H, W)``.
        eps: the noise added to them, same shape.
        t: integer timesteps ``(B,)``.
    Returns:
        ``eps`` itself (ε-prediction), ``x_0`` itself (``sample``), or the velocity, shape of ``x_0``.
    """
    if getattr(scheduler, "flow_matching", False):  # o2mkd_ray.core.flow_matching.FlowMatchTraining
        return scheduler.velocity(x_0, eps)
    pred = prediction_type(scheduler)
    if pred == "epsilon":
        return eps
    if pred == "sample":
        return x_0
    if pred == "v_prediction":
        if hasattr(scheduler, "get_velocity"):  # DDPM, DDIM, Euler...: diffusers' own formula
            return scheduler.get_velocity(x_0, eps, t)
        # schedulers without it (PNDM, a factory's) share add_noise's ᾱ_t table
        a = scheduler.alphas_cumprod.to(device=x_0.device, dtype=x_0.dtype)[t.to(x_0.device)]
        a = a.view(-1, *([1] * (x_0.ndim - 1)))
        return a.sqrt() * eps - (1 - a).sqrt() * x_0
    check_prediction_type(pred, type(scheduler).__name__)
    raise AssertionError("unreachable")
