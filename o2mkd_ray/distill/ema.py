"""The one exponential moving average of the package: the students' in distillation and the teacher's in
``o2mkd-ray teacher`` both use :class:`EMA`.

The averaging is diffusers' ``EMAModel`` (decay ``min(decay, (1 + s) / (10 + s))`` at update ``s + 1`` for s >= 1;
its first update copies the weights). Its ``save_pretrained`` is not used: it writes the EMA's own state (``decay``,
``optimization_step``, ``inv_gamma``, ...) into the UNet's ``config.json``, and diffusers then warns about those
keys on every load and keeps them in the loaded model's config (measured with diffusers 0.42). The averaged weights
live in a plain copy of the model instead, which saves as an ordinary UNet folder (``OUT/segments/seg-KK/ema`` and
``pipeline/`` are built from it).
"""

from __future__ import annotations

import copy

import torch
from diffusers.training_utils import EMAModel
from torch import nn


class EMA:
    """EMA weights of ``model``'s parameters, held by a copy of ``model`` that can run and be saved.

    Args:
        model: the trained module (its parameters are averaged; its buffers are copied once).
        decay: the largest decay (``train.ema_decay``); early updates use diffusers' warm-up schedule.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).requires_grad_(False).eval()
        # foreach: one fused update over all tensors (faster than a per-parameter loop on CPU, measured)
        self.averager = EMAModel(self.module.parameters(), decay=decay, foreach=True)
        # EMAModel keeps its own copy of the weights (shadow_params) and updates it in place: pointing it at the
        # module's parameters makes the module the average itself, with no second copy of the student in memory
        # (a BK-SDM-sized student is ~0.5 B parameters) and no copy_to before every use.
        self.averager.shadow_params = [p.data for p in self.module.parameters()]

    def step(self, model: nn.Module) -> None:
        """One EMA update of :attr:`module` towards ``model``'s current parameters."""
        self.averager.step(model.parameters())

    @property
    def decay(self) -> float | None:
        """The decay of the last update (None before the first)."""
        return self.averager.cur_decay_value

    def state_dict(self) -> dict:
        """The averager's counters and settings, without the weights (those are saved with :attr:`module`)."""
        return {k: v for k, v in self.averager.state_dict().items() if k != "shadow_params"}

    def load(self, weights: dict[str, torch.Tensor], state: dict | None, step: int) -> None:
        """Restores the EMA from saved weights and :meth:`state_dict` (None: a checkpoint written before it was
        saved; the update count is then the training ``step``). The configured decay wins over a saved one."""
        self.module.load_state_dict(weights)  # in place: the averager's shadow_params are these tensors
        saved = dict(state) if state else {"optimization_step": int(step)}
        saved.pop("shadow_params", None)
        self.averager.load_state_dict({**saved, "decay": self.averager.decay})
