"""Student weights from the teacher's: kept layers by BK-SDM's layer mapping, channels by leading slices.

In an up block the student's first layers come from the teacher's first layers and its last layer from the
teacher's last layer (the last one takes the skip from the previous stage, so only that pairing has matching
shapes; BK-SDM's ``copy_weight_from_teacher`` does the same, e.g. ``up_blocks.1.resnets.1 <- up_blocks.1.resnets.2``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

_LAYER = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$")


def _layer_counts(names) -> dict[tuple[str, int, str], int]:
    """``{(down_blocks|up_blocks, block, resnets|attentions): number of layers}`` from state-dict names."""
    out: dict[tuple[str, int, str], int] = {}
    for name in names:
        m = _LAYER.match(name)
        if m:
            k = (m[1], int(m[2]), m[3])
            out[k] = max(out.get(k, 0), int(m[4]) + 1)
    return out


def _teacher_layer(j: int, n_student: int, n_teacher: int, up: bool) -> int | None:
    """The teacher layer that seeds student layer ``j`` of a block (BK-SDM's mapping).

    Down blocks: layer j <- layer j. Up blocks: layer j <- layer j, except the student's last layer <- the teacher's
    last: an up block's last resnet is the one whose skip input comes from the previous stage
    (``in = out + in_channels``; the others take ``out + out``, the first ``prev + out``), so this is the pairing
    whose shapes agree. None: no teacher layer (a deeper student's extra layers keep their random init).
    """
    if up and n_student != n_teacher and j == n_student - 1:
        return n_teacher - 1
    if j < n_teacher - (1 if up and n_student != n_teacher else 0):
        return j
    return None


def _teacher_name(name: str, s_counts: Mapping, t_counts: Mapping) -> str | None:
    m = _LAYER.match(name)
    if not m:
        return name
    k = (m[1], int(m[2]), m[3])
    n_s, n_t = s_counts[k], t_counts.get(k)
    if n_t is None:
        return None
    j = _teacher_layer(int(m[4]), n_s, n_t, up=m[1] == "up_blocks")
    return None if j is None else f"{m[1]}.{m[2]}.{m[3]}.{j}.{m[5]}"


@torch.no_grad()
def init_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copies the teacher's weights into the student: kept layers by BK-SDM's layer mapping, channels by leading
    slices.

    Layers: with the teacher's depth every name maps to itself. With fewer (or more) layers in a block, the
    ``down_blocks.i.{resnets,attentions}.j`` of the student come from the teacher's layer j and those of
    ``up_blocks.i`` from the teacher's layer j except the student's last, which comes from the teacher's last (see
    :func:`_teacher_layer`; as BK-SDM's ``copy_weight_from_teacher``). A dropped mid block simply gets nothing.
    Channels: every mapped tensor whose every student dim is <= the teacher's gets ``teacher[:s0, :s1, ...]`` (the
    student's channel i is the teacher's channel i, so a width-1, same-depth student is an exact copy). Tensors
    without a match (extra layers, a larger student) keep their random init.

    Args:
        student: the model to fill in place.
        teacher: the source model.
    Returns:
        The number of tensors copied.
    """
    src = teacher.state_dict()
    dst_sd = student.state_dict()
    s_counts, t_counts = _layer_counts(dst_sd), _layer_counts(src)
    copied = 0
    for name, dst in dst_sd.items():  # state_dict tensors share storage with the module
        t_name = _teacher_name(name, s_counts, t_counts)
        t = None if t_name is None else src.get(t_name)
        if t is None or t.dim() != dst.dim() or any(s > u for s, u in zip(dst.shape, t.shape)):
            continue
        dst.copy_(t[tuple(slice(0, s) for s in dst.shape)])
        copied += 1
    return copied
