"""Transformer students (DiT, SD3's MMDiT) derived from the teacher: fewer blocks (depth) and fewer attention heads
(width), seeded with the teacher's weights.

Depth keeps ``round(depth * num_layers)`` of the teacher's blocks, evenly spaced from the first to the last (the
last one always: in SD3 it is the ``context_pre_only`` block that ends the text stream), and copies each kept block
whole. Width keeps ``round(width * num_attention_heads)`` heads of the teacher's head size; in these models the
hidden width is ``heads * head_dim``, so the whole residual stream narrows with it. The student's weights are the
teacher's leading slices (its first heads, first channels, first MLP units), except the adaptive-norm modulation
layers whose output packs several ``inner_dim``-sized chunks (shift / scale / gate ...): those are sliced chunk by
chunk so that every chunk keeps its meaning. A student at depth 1 and width 1 is an exact copy of the teacher.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel
from torch import nn

from o2mkd_ray.errors import ConfigError

Transformer = DiTTransformer2DModel | SD3Transformer2DModel
_CLASSES = {"DiTTransformer2DModel": DiTTransformer2DModel, "SD3Transformer2DModel": SD3Transformer2DModel}
_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
# fixed sin-cos tables computed from the width at construction: the student keeps its own
_NOT_COPIED = ("pos_embed.pos_embed",)


def is_transformer(model: nn.Module) -> bool:
    """True for the transformer teachers students can be built from (DiT and SD3)."""
    return isinstance(model, tuple(_CLASSES.values()))


def kept_blocks(n_teacher: int, n_student: int) -> list[int]:
    """The teacher blocks a student of ``n_student`` blocks keeps: evenly spaced, first and last included (one
    block: the last).

    Args:
        n_teacher: the teacher's ``num_layers``.
        n_student: the student's, 1 <= n_student <= n_teacher.
    Returns:
        ``n_student`` strictly increasing teacher block indices.
    """
    if not 1 <= n_student <= n_teacher:
        raise ConfigError(f"students.depth: a student needs 1..{n_teacher} blocks, got {n_student}")
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def _fraction(value: float, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{key}: must be a number in (0, 1], got {value!r}")
    return float(value)


def transformer_student_config(teacher_config: Mapping, depth: float = 1.0, width: float = 1.0) -> tuple[dict, list]:
    """A student's config from a DiT / SD3 teacher's, and the teacher blocks it keeps.

    Args:
        teacher_config: the teacher's diffusers config (``model.config``).
        depth: fraction of the teacher's blocks kept (``round(depth * num_layers)``, at least 1).
        width: fraction of the attention heads kept (at least 1), head size unchanged.
    Returns:
        ``(config, kept)``: the student's config (private ``_`` keys dropped; SD3's ``caption_projection_dim``
        follows the new width and ``dual_attention_layers`` the kept blocks) and :func:`kept_blocks`.
    Raises:
        ConfigError: ``depth`` / ``width`` outside (0, 1].
    """
    cfg = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    n_t, heads_t = int(cfg["num_layers"]), int(cfg["num_attention_heads"])
    kept = kept_blocks(n_t, max(1, round(_fraction(depth, "students.depth") * n_t)))
    heads = max(1, round(_fraction(width, "students.width") * heads_t))
    cfg.update(num_layers=len(kept), num_attention_heads=heads)
    if "caption_projection_dim" in cfg:  # SD3: the text stream has the image stream's width
        cfg["caption_projection_dim"] = heads * int(cfg["attention_head_dim"])
    if "dual_attention_layers" in cfg:  # SD3.5: the kept blocks keep their second attention
        dual = set(cfg["dual_attention_layers"] or ())
        cfg["dual_attention_layers"] = [i for i, j in enumerate(kept) if j in dual]
    return cfg, kept


def _inner_dim(model: nn.Module) -> int:
    return int(model.config.num_attention_heads) * int(model.config.attention_head_dim)


def _slice(src: torch.Tensor, shape: torch.Size, d_t: int, d_s: int) -> torch.Tensor | None:
    """``src`` cut to ``shape``: dim 0 chunk by chunk when it packs ``c`` inner-width chunks (``c * d_t`` ->
    ``c * d_s``), every other cut a leading slice; None when the shapes cannot match."""
    if src.dim() != len(shape) or any(s > t for s, t in zip(shape, src.shape)):
        return None
    out = src
    if shape[0] != src.shape[0] and src.shape[0] % d_t == 0 and shape[0] == (src.shape[0] // d_t) * d_s:
        c = src.shape[0] // d_t
        out = torch.cat([chunk[:d_s] for chunk in out.chunk(c, dim=0)], dim=0)
    return out[tuple(slice(0, s) for s in shape)]


@torch.no_grad()
def init_transformer_from_teacher(student: nn.Module, teacher: nn.Module, kept: list[int]) -> int:
    """Copies the teacher's weights into the student: student block i from teacher block ``kept[i]``, every tensor
    sliced to the student's shape (see the module docstring).

    Args:
        student: the student to fill in place.
        teacher: the teacher (same class).
        kept: the teacher block behind each student block (:func:`kept_blocks`).
    Returns:
        The number of tensors copied.
    """
    src = teacher.state_dict()
    d_t, d_s = _inner_dim(teacher), _inner_dim(student)
    copied = 0
    for name, dst in student.state_dict().items():  # state_dict tensors share storage with the module
        if name in _NOT_COPIED:
            continue
        m = _BLOCK.match(name)
        t = src.get(f"transformer_blocks.{kept[int(m[1])]}.{m[2]}" if m else name)
        value = None if t is None else _slice(t, dst.shape, d_t, d_s)
        if value is not None:
            dst.copy_(value)
            copied += 1
    return copied


def build_transformer_student(teacher: nn.Module, depth: float = 1.0, width: float = 1.0,
                              init: str = "teacher") -> Transformer:
    """One transformer student of the teacher's class.

    Args:
        teacher: a ``DiTTransformer2DModel`` or ``SD3Transformer2DModel``.
        depth: fraction of blocks kept (evenly spaced, the last always).
        width: fraction of attention heads kept (the hidden width follows: heads * head_dim).
        init: "teacher" copies the kept blocks and sliced heads (:func:`init_transformer_from_teacher`);
            "scratch" keeps the random init.
    Returns:
        The student, in eval mode as the teacher's pipelines use it.
    Raises:
        ConfigError: an unsupported teacher, ``init``, ``depth`` or ``width``.
    """
    if not is_transformer(teacher):
        raise ConfigError(f"teacher: {type(teacher).__name__} is not a transformer teacher; transformer students "
                          f"need one of {sorted(_CLASSES)}")
    if init not in ("teacher", "scratch"):
        raise ConfigError(f"students.init: must be 'teacher' or 'scratch', got {init!r}")
    cfg, kept = transformer_student_config(teacher.config, depth, width)
    student = type(teacher).from_config(cfg)
    dtype = next(teacher.parameters()).dtype
    if dtype != student.dtype:
        student = student.to(dtype)
    if init == "teacher":
        init_transformer_from_teacher(student, teacher, kept)
    return student.eval()


def disable_label_dropout(model: nn.Module) -> int:
    """Turns off the random class-label dropout of a DiT's label embedding in training mode (its table keeps the
    null class row, so guidance still works).

    In distillation the run itself drops labels to the null class (``data.uncond_prob``) and asks the teacher with
    the same dropped labels; a student dropping labels on its own would be taught the teacher's class-conditional
    output under the null class.

    Returns:
        The number of label embeddings changed (0 for models without one).
    """
    from diffusers.models.embeddings import LabelEmbedding

    found = [m for m in model.modules() if isinstance(m, LabelEmbedding)]
    for m in found:
        m.dropout_prob = 0.0
    return len(found)
