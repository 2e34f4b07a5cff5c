"""Students: one per timestep segment, built from the teacher's config (:mod:`o2mkd_ray.core.student_config`) and
seeded with its weights (:mod:`o2mkd_ray.core.student_init`).

O2MKD (Zhang & Ma, arXiv 2410.04191) distils one teacher into N smaller students, one per timestep segment; width
and depth combine freely and may differ per segment.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.student_config import UNet, make_unet, student_config, teacher_unet_config
from o2mkd_ray.core.student_init import init_from_teacher
from o2mkd_ray.errors import ConfigError


def build_student(
    teacher: nn.Module,
    width: float = 0.5,
    layers_per_block: int | Sequence[int] | None = None,
    unet_config: Mapping | None = None,
    init: str = "teacher",
    drop_mid_block: bool = False,
    transformer_layers_per_block: int | Sequence[int] | None = None,
) -> UNet:
    """Builds one student UNet.

    Args:
        teacher: the teacher network; a ``UNet2DModel`` / ``UNet2DConditionModel`` (or a module with a UNet-like
            ``.config``) unless ``unet_config`` is given.
        width: channel multiplier applied to the teacher's ``block_out_channels`` (ignored with ``unet_config``).
        layers_per_block: resnet layers per block (int, or one per down block for conditional UNets); None keeps
            the teacher's (or ``unet_config``'s).
        unet_config: an explicit UNet config (``students.unet``), used as given (conditional when it has
            ``cross_attention_dim`` or ``_class_name: UNet2DConditionModel``).
        init: "teacher" copies teacher weights (:func:`init_from_teacher`); "scratch" keeps the random init.
        drop_mid_block: build the student without a mid block (BK-SDM-Small).
        transformer_layers_per_block: fewer transformer layers per attention block (KOALA-style, for SDXL-like
            teachers; an int or one per down block; ignored with ``unet_config``); None keeps the teacher's.
    Returns:
        The student (the teacher's UNet class).
    Raises:
        ConfigError: a non-UNet teacher without ``unet_config``, a bad ``unet_config``, or a bad ``init``/``width``.
    """
    if init not in ("teacher", "scratch"):
        raise ConfigError(f"students.init: must be 'teacher' or 'scratch', got {init!r}")
    if unet_config is not None:
        cfg = dict(unet_config)
        if layers_per_block is not None:
            lp = layers_per_block
            cfg["layers_per_block"] = [int(v) for v in lp] if isinstance(lp, Sequence) else int(lp)
        if drop_mid_block:
            cfg["mid_block_type"] = None
        student = make_unet(cfg, "students.unet")
    else:
        student = make_unet(
            student_config(teacher_unet_config(teacher), width, layers_per_block, drop_mid_block,
                           transformer_layers_per_block),
            "students.width",
        )
    if init == "teacher":
        init_from_teacher(student, teacher)
    return student


def per_segment_values(value: Any, n: int, key: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ConfigError(f"{key}: got {len(value)} values for {n} segments; give one value or {n}")
        return list(value)
    return [value] * n


def build_students(cfg: Config, teacher: nn.Module, n: int) -> list[UNet]:
    """One student per timestep segment, from ``cfg.students``.

    Args:
        cfg: the run config (``students.width``/``layers_per_block`` may be one value or one per segment;
            ``students.drop_mid_block`` and ``students.transformer_layers_per_block`` apply to all; a DiT
            teacher's students keep ``students.depth`` of its blocks and ``students.width`` of its heads).
        teacher: the teacher network (see :func:`build_student`).
        n: number of segments.
    Returns:
        ``n`` students; student k's random init is seeded with ``cfg.train.seed + k``.
    """
    from o2mkd_ray.core.transformer_students import build_transformer_student, is_transformer

    st = cfg.students
    widths = per_segment_values(st.width, n, "students.width")
    layers = per_segment_values(st.layers_per_block, n, "students.layers_per_block")
    depths = per_segment_values(1.0 if st.depth is None else st.depth, n, "students.depth")
    students = []
    for k in range(n):
        with torch.random.fork_rng(devices=[]):  # seed locally; leave the caller's RNG stream untouched
            torch.manual_seed(cfg.train.seed + k)
            if is_transformer(teacher):  # DiT: fewer blocks (students.depth), fewer heads (students.width)
                students.append(build_transformer_student(teacher, depths[k], widths[k], st.init))
                continue
            students.append(
                build_student(teacher, widths[k], layers[k], st.unet, st.init, drop_mid_block=st.drop_mid_block,
                              transformer_layers_per_block=st.transformer_layers_per_block)
            )
    return students
