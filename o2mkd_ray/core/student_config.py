"""Student UNet configs derived from the teacher's: width (channels), depth (layers per block, mid block), valid
attention heads and norm groups; and building a UNet from such a config with one clear error line.

A student has the teacher's class and block layout with ``width`` times its channels, so the same feature blocks
exist in both (feature KD can pair them by name) and the teacher's weights can seed it (:mod:`student_init`). Two
teacher classes are understood: ``diffusers.UNet2DModel`` (pixel-space DDPM teachers) and
``diffusers.UNet2DConditionModel`` (Stable Diffusion teachers: the student keeps ``cross_attention_dim``, the text
encoder's width). Depth can shrink the BK-SDM way (Kim et al., "BK-SDM: A Lightweight, Fast, and Cheap Version of
Stable Diffusion"): ``layers_per_block=1`` removes one resnet(+attention) pair per down and up stage
("BK-SDM-Base"), ``drop_mid_block=True`` also removes the mid block ("BK-SDM-Small"). SDXL teachers (a
``UNet2DConditionModel`` with ``transformer_layers_per_block`` (1, 2, 10) and ``text_time`` added conditioning) also
shrink the KOALA way (Lee et al., "KOALA: Empirical Lessons Toward Memory-Efficient and Fast Diffusion Models for
Text-to-Image Synthesis"): ``transformer_layers_per_block`` gives fewer transformer layers per attention block.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Union

from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

from o2mkd_ray.errors import ConfigError

UNet = Union[UNet2DModel, UNet2DConditionModel]
_CLASSES = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}
_KEYS = {name: frozenset(inspect.signature(cls.__init__).parameters) - {"self"} for name, cls in _CLASSES.items()}
_UNET_KEYS = _KEYS["UNet2DModel"]
_COND_KEYS = _KEYS["UNet2DConditionModel"]
_COND_DEFAULTS = {
    k: p.default for k, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items() if k != "self"
}
_LAYOUT_KEYS = {
    "block_out_channels",
    "down_block_types",
    "up_block_types",
}  # what a "UNet2DModel-like" config has

# UNet2DConditionModel blocks and the config value their attention reads (see diffusers' get_down/mid/up_block):
# "heads": ``num_attention_heads`` (which defaults to ``attention_head_dim``: the legacy naming), channels // heads
# is the head dim; "head_dim": ``attention_head_dim`` is the real head dim, channels // head_dim heads.
_COND_ATTN = {
    "CrossAttnDownBlock2D": "heads",
    "CrossAttnUpBlock2D": "heads",
    "UNetMidBlock2DCrossAttn": "heads",
    "AttnDownBlock2D": "head_dim",
    "AttnUpBlock2D": "head_dim",
    "SimpleCrossAttnDownBlock2D": "head_dim",
    "SimpleCrossAttnUpBlock2D": "head_dim",
    "UNetMidBlock2DSimpleCrossAttn": "head_dim",
}


def _is_conditional(config: Mapping) -> bool:
    """A ``UNet2DConditionModel`` config: ``_class_name`` says so, or (without a class name) it has
    ``cross_attention_dim``."""
    name = config.get("_class_name")
    if name in _CLASSES:
        return name == "UNet2DConditionModel"
    return "cross_attention_dim" in config


def _largest_divisor_at_most(n: int, cap: int) -> int:
    """Largest d <= cap with n % d == 0 (n, cap >= 1)."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _attention_channels(cfg: Mapping) -> list[int]:
    """Channel counts of the blocks that build an ``Attention`` (their count must be divisible by the head dim)."""
    ch = list(cfg["block_out_channels"])
    out = [c for c, kind in zip(ch, cfg["down_block_types"]) if "Attn" in kind]
    out += [c for c, kind in zip(reversed(ch), cfg["up_block_types"]) if "Attn" in kind]
    if cfg.get("mid_block_type", "UNetMidBlock2D") is not None and cfg.get("add_attention", True):
        out.append(ch[-1])
    return out


def _cond_attention_constraints(cfg: Mapping) -> dict[str, list[tuple[int, int]]]:
    """``{config key: [(index into the per-block list, channels), ...]}`` for a UNet2DConditionModel config.

    Each attention block needs ``channels % value == 0`` where value is ``cfg[key]`` (or ``cfg[key][index]`` when
    the key holds a per-block list). Mirrors UNet2DConditionModel.__init__: up block i reads the *reversed* head
    counts (index n-1-i) but the *unreversed* ``attention_head_dim[i]``; the mid block reads index -1 of both.
    """
    ch = [int(c) for c in cfg["block_out_channels"]]
    n = len(ch)
    heads_key = "num_attention_heads" if cfg.get("num_attention_heads") is not None else "attention_head_dim"
    keys = {"heads": heads_key, "head_dim": "attention_head_dim"}
    out: dict[str, list[tuple[int, int]]] = {}

    def add(kind: str | None, reversed_index: int, plain_index: int, c: int) -> None:
        role = _COND_ATTN.get(kind or "")
        if role is not None:
            out.setdefault(keys[role], []).append((reversed_index if role == "heads" else plain_index, c))

    for i, kind in enumerate(cfg["down_block_types"]):
        add(kind, i, i, ch[i])
    add(cfg.get("mid_block_type", _COND_DEFAULTS["mid_block_type"]), n - 1, n - 1, ch[-1])
    for i, kind in enumerate(cfg["up_block_types"]):
        add(kind, n - 1 - i, i, ch[n - 1 - i])
    return out


def _fix_cond_heads(cfg: dict) -> None:
    """Reduces head counts / head dims (int or per-block list) of a UNet2DConditionModel config in place, each to
    the largest divisor of its blocks' channel counts that is <= the teacher's value; valid values are kept."""
    for key, pairs in _cond_attention_constraints(cfg).items():
        value = cfg.get(key, _COND_DEFAULTS.get(key))
        if value is None:  # attention_head_dim None: diffusers uses the channel count (always valid)
            continue
        if isinstance(value, int):
            common = math.gcd(*(c for _, c in pairs))
            if common % value:
                cfg[key] = _largest_divisor_at_most(common, value)
            continue
        values = list(value)
        for idx in {i % len(values) for i, _ in pairs}:
            v = values[idx]
            if v is None:
                continue
            common = math.gcd(*(c for i, c in pairs if i % len(values) == idx))
            if common % int(v):
                values[idx] = _largest_divisor_at_most(common, int(v))
        cfg[key] = values


def student_config(
    teacher_config: Mapping,
    width: float,
    layers_per_block: int | Sequence[int] | None = None,
    drop_mid_block: bool = False,
    transformer_layers_per_block: int | Sequence[int] | None = None,
) -> dict:
    """A student config: the teacher's blocks with ``width`` times the channels (and optionally fewer layers).

    Works for ``UNet2DModel`` and ``UNet2DConditionModel`` configs (conditional: has ``cross_attention_dim`` or
    ``_class_name == "UNet2DConditionModel"``). Channel counts stay valid for GroupNorm: the group count is halved
    only while some scaled count is smaller than it; otherwise each count is rounded to a multiple of the group count
    (never to 0). Block types (attention included) are kept; ``time_embedding_dim`` (when set) scales with width.
    ``width=1`` with the teacher's depth returns the teacher's shape.

    Attention: for ``UNet2DModel`` ``attention_head_dim`` (the head dim) and ``attn_norm_num_groups`` are kept when
    they still divide the new channel counts, else reduced to the largest value that does. For
    ``UNet2DConditionModel`` ``cross_attention_dim`` is kept (it must equal the text encoder's width) and is always
    written out; the per-block head count (``num_attention_heads``, or ``attention_head_dim`` when that is None:
    diffusers' legacy naming, SD 1.x's ``attention_head_dim=8`` means 8 heads) and the real head dim of
    ``Attn``/``SimpleCrossAttn`` blocks are each reduced, per block when given as a list, to the largest divisor of
    the block's channels that is <= the teacher's value, only where needed.

    Args:
        teacher_config: a diffusers UNet config (dict or FrozenDict); keys starting with "_" are dropped.
        width: channel multiplier (> 0).
        layers_per_block: resnet layers per block (an int, or for ``UNet2DConditionModel`` one per down block);
            None keeps the teacher's. BK-SDM-Base is ``layers_per_block=1`` of SD 1.x's 2.
        drop_mid_block: no mid block (``mid_block_type=None``; BK-SDM-Small).
        transformer_layers_per_block: ``UNet2DConditionModel`` only: transformer layers in each attention block (an
            int, or one per down block; up blocks take the list reversed, the mid block its last entry, as diffusers
            builds them); None keeps the teacher's. E.g. SDXL's (1, 2, 10) -> (1, 2, 5).
    Returns:
        A plain dict accepted by ``UNet2DModel(**config)`` or ``UNet2DConditionModel(**config)`` (see
        :func:`make_unet`, which tells them apart).
    Raises:
        ConfigError: when ``width`` would give a block zero channels, or the class cannot take the depth options.
    """
    conditional = _is_conditional(teacher_config)
    cfg = {k: v for k, v in dict(teacher_config).items() if not str(k).startswith("_")}
    channels = [int(c) for c in cfg["block_out_channels"]]
    new, groups = _scaled_channels(channels, width, cfg.get("norm_num_groups", 32))
    if groups:
        cfg["norm_num_groups"] = groups
    if new == channels:  # width 1 (or a rounding no-op): keep the teacher's config exactly
        out = dict(cfg, block_out_channels=list(channels))
    else:
        out = dict(cfg, block_out_channels=new)
        if out.get("time_embedding_dim"):
            out["time_embedding_dim"] = max(1, round(out["time_embedding_dim"] * width))
        if not conditional:
            _fix_unet_attention(out)
    for key in ("down_block_types", "up_block_types"):
        out[key] = list(cfg[key])
    _set_depth(out, layers_per_block, drop_mid_block, conditional)
    if transformer_layers_per_block is not None:
        _set_transformer_depth(out, transformer_layers_per_block, conditional)
    if conditional:
        out.setdefault("cross_attention_dim", _COND_DEFAULTS["cross_attention_dim"])  # self-describing: conditional
        _fix_cond_heads(out)
    return out


def _scaled_channels(channels: list[int], width: float, groups) -> tuple[list[int], int | None]:
    """``width`` times each channel count, valid for GroupNorm: the group count is halved only while some scaled
    count is smaller than it, then each count is rounded to a multiple of it (never to 0). Returns the counts and
    the group count (None: diffusers picks groups itself)."""
    if not width > 0:
        raise ConfigError(f"students.width: must be > 0, got {width}")
    raw = [c * width for c in channels]  # unrounded student channels
    for i, (c, r) in enumerate(zip(channels, raw)):
        if round(r) < 1:
            raise ConfigError(
                f"students.width: {width} gives 0 channels for block_out_channels[{i}]={c}; "
                f"use a width of at least {1 / min(channels):.3g} or set students.unet explicitly"
            )
    if not groups:
        return [max(1, round(r)) for r in raw], None
    groups = int(groups)
    while groups > 1 and min(raw) < groups:  # too few channels for this many groups: fewer groups
        groups //= 2
    return [max(groups, round(r / groups) * groups) for r in raw], groups


def _fix_unet_attention(out: dict) -> None:
    """UNet2DModel: ``attn_norm_num_groups`` and the head dim reduced, in place, to values that divide the new
    channel counts (diffusers' Attention uses heads = channels // head_dim)."""
    new = out["block_out_channels"]
    common = math.gcd(*new)
    if out.get("attn_norm_num_groups") and common % out["attn_norm_num_groups"]:
        out["attn_norm_num_groups"] = math.gcd(out["attn_norm_num_groups"], common)
    head_dim = out.get("attention_head_dim", 8)
    attn = _attention_channels(out)
    if head_dim and attn and any(c % head_dim for c in attn):
        out["attention_head_dim"] = _largest_divisor_at_most(math.gcd(*attn), head_dim)


def _set_depth(out: dict, layers_per_block, drop_mid_block: bool, conditional: bool) -> None:
    """Applies ``students.layers_per_block`` and ``students.drop_mid_block`` to a student config in place."""
    if layers_per_block is not None:
        if isinstance(layers_per_block, Sequence) and not isinstance(layers_per_block, str):
            if not conditional:
                raise ConfigError(
                    "students.layers_per_block: UNet2DModel takes one layer count for every block, "
                    f"got {list(layers_per_block)}"
                )
            out["layers_per_block"] = [int(v) for v in layers_per_block]
        else:
            out["layers_per_block"] = int(layers_per_block)
    if drop_mid_block:
        keys = _COND_KEYS if conditional else _UNET_KEYS
        if "mid_block_type" not in keys:  # UNet2DModel takes mid_block_type=None only in newer diffusers
            raise ConfigError(
                "students.drop_mid_block: this diffusers' UNet2DModel cannot drop its mid block; set it to false"
            )
        out["mid_block_type"] = None


def _set_transformer_depth(out: dict, layers, conditional: bool) -> None:
    """Applies ``transformer_layers_per_block`` (KOALA-style transformer depth) to a student config in place."""
    if not conditional:
        raise ConfigError("students.transformer_layers_per_block: only UNet2DConditionModel teachers have "
                          "transformer layers per block; remove it")
    if out.get("reverse_transformer_layers_per_block") is not None:
        raise ConfigError("students.transformer_layers_per_block: the teacher sets "
                          "reverse_transformer_layers_per_block (its up blocks have their own depths); set "
                          "students.unet to an explicit config instead")
    many = isinstance(layers, Sequence) and not isinstance(layers, str)
    values = [int(v) for v in layers] if many else [int(layers)]
    if any(v < 1 for v in values):
        raise ConfigError(f"students.transformer_layers_per_block: every entry must be >= 1, got "
                          f"{values if many else values[0]}")
    n = len(out["down_block_types"])
    if many and len(values) != n:
        raise ConfigError(f"students.transformer_layers_per_block: got {len(values)} values for {n} down blocks; "
                          f"give one value or {n}")
    out["transformer_layers_per_block"] = values if many else values[0]


def teacher_unet_config(teacher: nn.Module) -> dict:
    """The teacher's UNet2DModel / UNet2DConditionModel config, or a ConfigError asking for ``students.unet``.

    A conditional teacher's config always comes back with ``cross_attention_dim`` (what marks it conditional
    once the ``_class_name`` key is dropped).
    """
    cfg = getattr(teacher, "config", None)
    like_unet = isinstance(cfg, Mapping) and _LAYOUT_KEYS <= set(cfg)
    if not (isinstance(teacher, (UNet2DModel, UNet2DConditionModel)) or like_unet):
        raise ConfigError(
            f"students.unet: the teacher ({type(teacher).__name__}) is not a diffusers UNet2DModel or "
            "UNet2DConditionModel, so the student shape cannot be derived from it; set students.unet to a UNet2DModel "
            "config, e.g. "
            "{sample_size: 16, in_channels: 1, out_channels: 1, block_out_channels: [32, 64], norm_num_groups: 8}"
        )
    conditional = isinstance(teacher, UNet2DConditionModel) or _is_conditional(cfg)
    name = "UNet2DConditionModel" if conditional else "UNet2DModel"
    out = {k: v for k, v in dict(cfg).items() if not str(k).startswith("_")}
    extra = sorted(set(out) - _KEYS[name])
    if extra:
        raise ConfigError(
            f"students.unet: the teacher's config has keys {name} does not take ({', '.join(extra)}); "
            f"set students.unet to an explicit {name} config"
        )
    if conditional:
        out.setdefault("cross_attention_dim", _COND_DEFAULTS["cross_attention_dim"])
    return out


def make_unet(config: Mapping, key: str) -> UNet:
    """``UNet2DModel(**config)`` or, for a conditional config (``_class_name: UNet2DConditionModel`` or a
    ``cross_attention_dim`` key), ``UNet2DConditionModel(**config)``, with a one-line ConfigError naming ``key``
    on bad input."""
    name = config.get("_class_name")
    if name is not None and name not in _CLASSES:
        raise ConfigError(f"{key}: _class_name {name!r} is not supported; use UNet2DModel or UNet2DConditionModel")
    name = "UNet2DConditionModel" if _is_conditional(config) else "UNet2DModel"
    config = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    unknown = sorted(set(config) - _KEYS[name])
    if unknown:
        raise ConfigError(f"{key}: unknown {name} keys {unknown}; see diffusers.{name} for the accepted ones")
    try:
        return _CLASSES[name](**config)
    except (ValueError, TypeError, KeyError, ZeroDivisionError, AssertionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: {name} rejected this config ({first})") from None
