"""Feature hooks on UNet blocks: which blocks, their outputs during a forward, their channel counts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Self

import torch
from torch import Tensor, nn

from o2mkd_ray.core.conditioning import cond_kwargs


def hookable_blocks(model: nn.Module) -> list[str]:
    """Names of the UNet blocks whose outputs feature KD can match, in forward order.

    Args:
        model: a diffusers UNet (``down_blocks``, ``mid_block``, ``up_blocks``) or any module.
    Returns:
        ``["down_blocks.0", ..., "mid_block", "up_blocks.0", ...]``; ``[]`` for a module without these blocks.
    """
    names: list[str] = []
    down, mid, up = (getattr(model, a, None) for a in ("down_blocks", "mid_block", "up_blocks"))
    if isinstance(down, nn.ModuleList):
        names += [f"down_blocks.{i}" for i in range(len(down))]
    if isinstance(mid, nn.Module):
        names.append("mid_block")
    if isinstance(up, nn.ModuleList):
        names += [f"up_blocks.{i}" for i in range(len(up))]
    return names


def statistics_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks whose output activations describe a denoiser's features along t, in forward order.

    A UNet's :func:`hookable_blocks`; for a transformer denoiser (DiT, SD3's MMDiT: a ``transformer_blocks``
    ``ModuleList``) every transformer block, ``["transformer_blocks.0", ...]``. (Feature KD does not use the
    transformer blocks: a student of a smaller depth has fewer of them, so there is no block-to-block match.)
    """
    names = hookable_blocks(model)
    blocks = getattr(model, "transformer_blocks", None)
    if not names and isinstance(blocks, nn.ModuleList):
        names = [f"transformer_blocks.{i}" for i in range(len(blocks))]
    return names


# blocks that return a tuple whose image stream is not element 0: SD3's joint blocks return
# (encoder_hidden_states, hidden_states), the text stream first
_IMAGE_STREAM_INDEX = {"JointTransformerBlock": 1}


class FeatureHooks:
    """Forward hooks that keep the output of named blocks in ``.features`` (a context manager).

    Down blocks return ``(hidden_states, res_samples)``; element 0 (the block's output) is kept. SD3's joint
    transformer blocks return ``(encoder_hidden_states, hidden_states)``; the image stream (element 1) is kept.

    Example::

        with FeatureHooks(student, ["mid_block"]) as hooks:
            eps_s = student(x_t, t).sample
        hooks.features["mid_block"]  # (B, C, H, W)
    """

    def __init__(self, model: nn.Module, blocks: Iterable[str] | None = None, detach: bool = False):
        """Registers the hooks.

        Args:
            model: the network to hook.
            blocks: submodule names; None hooks every :func:`hookable_blocks` entry.
            detach: store detached tensors (for a frozen teacher).
        """
        # per thread: the teacher service runs concurrent forwards of one model in a thread pool
        self._local = threading.local()
        self.blocks = list(hookable_blocks(model) if blocks is None else blocks)
        self._handles = []
        for name in self.blocks:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"FeatureHooks: {type(model).__name__} has no block {name!r}; hookable: {hookable_blocks(model)}"
                ) from None
            index = _IMAGE_STREAM_INDEX.get(type(module).__name__, 0)
            self._handles.append(module.register_forward_hook(self._hook(name, detach, index)))

    def _hook(self, name: str, detach: bool, index: int = 0):
        def hook(module, args, output):
            out = output[index] if isinstance(output, (tuple, list)) else output
            self.features[name] = out.detach() if detach else out

        return hook

    @property
    def features(self) -> dict[str, Tensor]:
        """Outputs of the hooked blocks from this thread's latest forward."""
        d = getattr(self._local, "features", None)
        if d is None:
            d = self._local.features = {}
        return d

    def clear(self) -> None:
        """Forgets the stored features (call between steps so the graph is freed)."""
        self._local.features = {}

    def remove(self) -> None:
        """Unregisters the hooks; stored features stay readable."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def dummy_cond(model: nn.Module, batch: int = 1, seq_len: int = 1):
    """A zero condition for probing a conditional UNet's feature shapes and costs (they do not depend on the
    text): text embeddings ``(batch, seq_len, cross_attention_dim)``, plus SDXL's pooled ``text_embeds`` and
    ``time_ids`` (a dict, :mod:`o2mkd_ray.core.conditioning`) when the UNet has ``addition_embed_type="text_time"``;
    None for an unconditional UNet."""
    cfg = getattr(model, "config", None)
    dim = cfg.get("cross_attention_dim") if hasattr(cfg, "get") else None
    if not dim:
        return None
    p = next(model.parameters())
    text = torch.zeros(batch, seq_len, int(dim), device=p.device, dtype=p.dtype)
    if cfg.get("addition_embed_type") != "text_time":
        return text
    n_time = 6 * int(cfg["addition_time_embed_dim"])  # SDXL: 6 time ids, each embedded in addition_time_embed_dim
    pooled = int(cfg["projection_class_embeddings_input_dim"]) - n_time
    return {"encoder_hidden_states": text, "text_embeds": torch.zeros(batch, pooled, device=p.device, dtype=p.dtype),
            "time_ids": torch.zeros(batch, 6, device=p.device, dtype=p.dtype)}


def _call(model: nn.Module, x_t: Tensor, t: Tensor) -> Tensor:
    out = model(x_t, t, **cond_kwargs(dummy_cond(model, x_t.shape[0])))
    return getattr(out, "sample", out[0] if isinstance(out, tuple) else out)


@torch.no_grad()
def probe_feature_channels(
    model: nn.Module, sample_shape: Sequence[int], blocks: Iterable[str] | None = None, timestep: int = 0
) -> dict[str, int]:
    """Channel count of each block's output, from one dummy forward.

    Args:
        model: the network (called as ``model(x, t)``).
        sample_shape: input shape ``(B, C, H, W)``; batch 1 is enough.
        blocks: block names; None probes every :func:`hookable_blocks` entry.
        timestep: the dummy timestep.
    Returns:
        ``{block: channels}``; ``{}`` when there is nothing to probe.
    """
    blocks = list(hookable_blocks(model) if blocks is None else blocks)
    if not blocks:
        return {}
    p = next(model.parameters())
    x_t = torch.zeros(tuple(sample_shape), device=p.device, dtype=p.dtype)
    t = torch.full((x_t.shape[0],), int(timestep), device=p.device, dtype=torch.long)
    with FeatureHooks(model, blocks, detach=True) as hooks:
        _call(model, x_t, t)
    return {b: int(hooks.features[b].shape[1]) for b in blocks}
