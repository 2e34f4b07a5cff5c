"""The one definition of cost: parameters, MACs per forward (``torch.utils.flop_counter``), and sampling cost
per run, weighted by the steps each student actually takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not).

    Args:
        model: any module.
    Returns:
        The parameter count.
    """
    return sum(p.numel() for p in model.parameters())


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention uses
# here, which would silently count attention as free.
_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_macs(
    model: nn.Module,
    sample_shape: Sequence[int] | None = None,
    timestep: int = 500,
    seq_len: int = 77,
    **forward_kwargs: Any,
) -> int:
    """Multiply-accumulates of one forward ``model(x_t, t)``, counted with ``torch.utils.flop_counter``.

    Counts matmuls, convolutions and attention (MACs = FLOPs / 2); elementwise ops and norms are not counted.
    Works on a model on the ``meta`` device too (no compute, shapes only). A conditional model
    (``UNet2DConditionModel``, or a config with ``cross_attention_dim``) called without ``encoder_hidden_states``
    gets zeros of shape ``(B, seq_len, cross_attention_dim)`` (``encoder_hid_dim`` when set) as the text.

    Args:
        model: a ``UNet2DModel`` / ``UNet2DConditionModel`` or any module called as ``model(x, t)``.
        sample_shape: input shape; default ``(1, in_channels, sample_size, sample_size)`` from ``model.config``.
        timestep: the timestep passed as a ``(B,)`` long tensor.
        seq_len: text length of the stand-in ``encoder_hidden_states`` of a conditional model (77: SD's CLIP
            tokenizer length); ignored when ``encoder_hidden_states`` is passed or the model is unconditional.
        **forward_kwargs: extra keyword arguments for the forward (e.g. ``class_labels``, ``encoder_hidden_states``).
    Returns:
        MACs of one forward at the given shape (batch 1 by default).
    """
    cfg = getattr(model, "config", None) or {}
    if sample_shape is None:
        size, ch = cfg.get("sample_size"), cfg.get("in_channels")
        if size is None or ch is None:
            raise ValueError(
                "count_macs: model has no config.sample_size/in_channels; pass sample_shape=(1, C, H, W)"
            )
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        sample_shape = (1, ch, h, w)
    p = next(model.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    x_t = torch.zeros(tuple(sample_shape), device=device, dtype=dtype)  # (B, C, H, W)
    t = torch.full((x_t.shape[0],), int(timestep), device=device, dtype=torch.long)
    conditional = isinstance(model, UNet2DConditionModel) or (
        isinstance(cfg, Mapping) and "cross_attention_dim" in cfg
    )
    if conditional and "encoder_hidden_states" not in forward_kwargs:
        dim = cfg.get("encoder_hid_dim") or cfg.get("cross_attention_dim")
        if not isinstance(dim, int):
            raise ValueError(
                f"count_macs: cannot infer the text width from cross_attention_dim={dim!r}; "
                "pass encoder_hidden_states=(B, L, D)"
            )
        forward_kwargs["encoder_hidden_states"] = torch.zeros(
            x_t.shape[0], int(seq_len), dim, device=device, dtype=dtype
        )  # (B, L, D)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
        model(x_t, t, **forward_kwargs)
    return counter.get_total_flops() // 2


def costs(model: nn.Module, shape, seq_len: int = 77) -> dict:
    """Parameters and MACs of one forward at batch 1; a text-conditioned UNet sees ``seq_len`` text tokens."""

    return {"params": int(count_params(model)), "macs": int(count_macs(model, (1, *shape), seq_len=seq_len))}
