"""Student UNets: a config derived from the teacher (width, depth), init by channel slicing, build, cost.

O2MKD (Zhang & Ma, arXiv 2410.04191) distils one teacher into N smaller students, one per timestep segment. A
student here is a diffusers ``UNet2DModel`` with the teacher's block layout and ``width`` times its channels,
so the same feature blocks exist in both (feature KD can pair them by name) and the teacher's weights can seed the
student by taking leading channel slices.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import UNet2DModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from o2mkd_ray.config import Config, ConfigError

_UNET_KEYS = frozenset(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}
_LAYOUT_KEYS = {
    "block_out_channels",
    "down_block_types",
    "up_block_types",
}  # what a "UNet2DModel-like" config has


# ----------------------------------------------------------------------------------------------------------
# config


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


def student_config(teacher_config: Mapping, width: float, layers_per_block: int | None = None) -> dict:
    """A ``UNet2DModel`` config for a student: the teacher's blocks with ``width`` times the channels.

    Channel counts stay valid for GroupNorm: the group count is halved only while some scaled count is smaller
    than it; otherwise each count is rounded to a multiple of the group count (never to 0). Block types (attention
    included) are kept; ``attention_head_dim`` and ``attn_norm_num_groups`` are kept when they still divide the new
    channel counts, else reduced to the largest value that does. ``width=1`` returns the teacher's shape.

    Args:
        teacher_config: a diffusers ``UNet2DModel`` config (dict or FrozenDict); keys starting with "_" are dropped.
        width: channel multiplier (> 0).
        layers_per_block: resnet layers per block; None keeps the teacher's.
    Returns:
        A plain dict accepted by ``UNet2DModel(**config)``.
    Raises:
        ConfigError: when ``width`` would give a block zero channels.
    """
    cfg = {k: v for k, v in dict(teacher_config).items() if not str(k).startswith("_")}
    channels = [int(c) for c in cfg["block_out_channels"]]
    if not width > 0:
        raise ConfigError(f"students.width: must be > 0, got {width}")
    raw = [c * width for c in channels]  # unrounded student channels
    for i, (c, r) in enumerate(zip(channels, raw)):
        if round(r) < 1:
            raise ConfigError(
                f"students.width: {width} gives 0 channels for block_out_channels[{i}]={c}; "
                f"use a width of at least {1 / min(channels):.3g} or set students.unet explicitly"
            )
    groups = cfg.get("norm_num_groups", 32)
    if groups:
        groups = int(groups)
        while groups > 1 and min(raw) < groups:  # too few channels for this many groups: fewer groups
            groups //= 2
        new = [max(groups, round(r / groups) * groups) for r in raw]
        cfg["norm_num_groups"] = groups
    else:  # None: diffusers picks groups itself from block_out_channels[0]
        new = [max(1, round(r)) for r in raw]
    if new == channels:  # width 1 (or a rounding no-op): keep the teacher's config exactly
        out = dict(cfg, block_out_channels=list(channels))
    else:
        out = dict(cfg, block_out_channels=new)
        if out.get("time_embedding_dim"):
            out["time_embedding_dim"] = max(1, round(out["time_embedding_dim"] * width))
        common = math.gcd(*new)
        if out.get("attn_norm_num_groups") and common % out["attn_norm_num_groups"]:
            out["attn_norm_num_groups"] = math.gcd(out["attn_norm_num_groups"], common)
        head_dim = out.get("attention_head_dim", 8)
        attn = _attention_channels(out)
        # heads = channels // head_dim in diffusers' Attention: the head dim must divide every attention block width
        if head_dim and attn and any(c % head_dim for c in attn):
            out["attention_head_dim"] = _largest_divisor_at_most(math.gcd(*attn), head_dim)
    for key in ("down_block_types", "up_block_types"):
        out[key] = list(cfg[key])
    if layers_per_block is not None:
        out["layers_per_block"] = int(layers_per_block)
    return out


def _teacher_unet_config(teacher: nn.Module) -> dict:
    """The teacher's UNet2DModel config, or a ConfigError asking for ``students.unet``."""
    cfg = getattr(teacher, "config", None)
    like_unet = isinstance(cfg, Mapping) and _LAYOUT_KEYS <= set(cfg)
    if not (isinstance(teacher, UNet2DModel) or like_unet):
        raise ConfigError(
            f"students.unet: the teacher ({type(teacher).__name__}) is not a diffusers UNet2DModel, so the student "
            "shape cannot be derived from it; set students.unet to a UNet2DModel config, e.g. "
            "{sample_size: 16, in_channels: 1, out_channels: 1, block_out_channels: [32, 64], norm_num_groups: 8}"
        )
    out = {k: v for k, v in dict(cfg).items() if not str(k).startswith("_")}
    extra = sorted(set(out) - _UNET_KEYS)
    if extra:
        raise ConfigError(
            f"students.unet: the teacher's config has keys UNet2DModel does not take ({', '.join(extra)}); "
            "set students.unet to an explicit UNet2DModel config"
        )
    return out


def _make_unet(config: Mapping, key: str) -> UNet2DModel:
    """``UNet2DModel(**config)`` with a ConfigError naming ``key`` on bad input."""
    config = {k: v for k, v in dict(config).items() if not str(k).startswith("_")}
    unknown = sorted(set(config) - _UNET_KEYS)
    if unknown:
        raise ConfigError(
            f"{key}: unknown UNet2DModel keys {unknown}; see diffusers.UNet2DModel for the accepted ones"
        )
    try:
        return UNet2DModel(**config)
    except (ValueError, TypeError, KeyError, ZeroDivisionError) as e:
        raise ConfigError(f"{key}: UNet2DModel rejected this config ({e})") from None


# ----------------------------------------------------------------------------------------------------------
# init and build


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copies the teacher's weights into the student by leading channel slices.

    Every parameter/buffer whose name exists in both and whose every student dim is <= the teacher's gets
    ``teacher[:s0, :s1, ...]`` (the student's channel i is the teacher's channel i, so a width-1 student is an exact
    copy). Tensors without a match (extra layers, a larger student) keep their random init.

    Args:
        student: the model to fill in place.
        teacher: the source model.
    Returns:
        The number of tensors copied.
    """
    src = teacher.state_dict()
    copied = 0
    for name, dst in student.state_dict().items():  # state_dict tensors share storage with the module
        t = src.get(name)
        if t is None or t.dim() != dst.dim() or any(s > u for s, u in zip(dst.shape, t.shape)):
            continue
        dst.copy_(t[tuple(slice(0, s) for s in dst.shape)])
        copied += 1
    return copied


def build_student(
    teacher: nn.Module,
    width: float = 0.5,
    layers_per_block: int | None = None,
    unet_config: Mapping | None = None,
    init: str = "teacher",
) -> UNet2DModel:
    """Builds one student UNet.

    Args:
        teacher: the teacher network; a ``UNet2DModel`` (or a module with a UNet2DModel-like ``.config``) unless
            ``unet_config`` is given.
        width: channel multiplier applied to the teacher's ``block_out_channels`` (ignored with ``unet_config``).
        layers_per_block: resnet layers per block; None keeps the teacher's (or ``unet_config``'s).
        unet_config: an explicit ``UNet2DModel`` config (``students.unet``), used as given.
        init: "teacher" copies teacher weights by channel slicing (:func:`init_from_teacher`); "scratch" keeps the
            random init.
    Returns:
        The student ``UNet2DModel``.
    Raises:
        ConfigError: a non-UNet teacher without ``unet_config``, a bad ``unet_config``, or a bad ``init``/``width``.
    """
    if init not in ("teacher", "scratch"):
        raise ConfigError(f"students.init: must be 'teacher' or 'scratch', got {init!r}")
    if unet_config is not None:
        cfg = dict(unet_config)
        if layers_per_block is not None:
            cfg["layers_per_block"] = int(layers_per_block)
        student = _make_unet(cfg, "students.unet")
    else:
        student = _make_unet(
            student_config(_teacher_unet_config(teacher), width, layers_per_block), "students.width"
        )
    if init == "teacher":
        init_from_teacher(student, teacher)
    return student


def _per_segment(value: Any, n: int, key: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ConfigError(f"{key}: got {len(value)} values for {n} segments; give one value or {n}")
        return list(value)
    return [value] * n


def build_students(cfg: Config, teacher: nn.Module, n: int) -> list[UNet2DModel]:
    """One student per timestep segment, from ``cfg.students``.

    Args:
        cfg: the run config (``students.width``/``layers_per_block`` may be one value or one per segment).
        teacher: the teacher network (see :func:`build_student`).
        n: number of segments.
    Returns:
        ``n`` students; student k's random init is seeded with ``cfg.train.seed + k``.
    """
    st = cfg.students
    widths = _per_segment(st.width, n, "students.width")
    layers = _per_segment(st.layers_per_block, n, "students.layers_per_block")
    students = []
    for k in range(n):
        with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG stream untouched
            torch.manual_seed(cfg.train.seed + k)
            students.append(build_student(teacher, widths[k], layers[k], st.unet, st.init))
    return students


# ----------------------------------------------------------------------------------------------------------
# cost


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
    **forward_kwargs: Any,
) -> int:
    """Multiply-accumulates of one forward ``model(x_t, t)``, counted with ``torch.utils.flop_counter``.

    Counts matmuls, convolutions and attention (MACs = FLOPs / 2); elementwise ops and norms are not counted.
    Works on a model on the ``meta`` device too (no compute, shapes only).

    Args:
        model: a ``UNet2DModel`` or any module called as ``model(x, t)``.
        sample_shape: input shape; default ``(1, in_channels, sample_size, sample_size)`` from ``model.config``.
        timestep: the timestep passed as a ``(B,)`` long tensor.
        **forward_kwargs: extra keyword arguments for the forward (e.g. ``class_labels``).
    Returns:
        MACs of one forward at the given shape (batch 1 by default).
    """
    if sample_shape is None:
        cfg = getattr(model, "config", None) or {}
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
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
        model(x_t, t, **forward_kwargs)
    return counter.get_total_flops() // 2
