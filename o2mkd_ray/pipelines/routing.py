"""What the multi-student models share: recording students in a diffusers config, and running each element of a
batch on the student that owns its timestep.

:class:`~o2mkd_ray.pipelines.multi_unet.MultiStudentUNet` and
:class:`~o2mkd_ray.pipelines.multi_transformer.MultiStudentTransformer` differ only in their students' forward
signatures and in the config keys their pipelines read; routing (one owner: the whole batch untouched, so that a
single student is bit-exact with the model it copies; several owners: one call per owner on its rows) lives here.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence

import diffusers
import torch
from torch import nn

from o2mkd_ray.core.segments import Segments


class SegmentStudents:
    """The accessors both multi-student models expose: their :class:`Segments` and student k. A mixin for a
    ``ModelMixin`` that holds its students in ``self.students`` and its segments in ``self._segments``."""

    students: nn.ModuleList
    _segments: Segments

    @property
    def segments(self) -> Segments:
        return self._segments

    @property
    def num_students(self) -> int:
        return len(self.students)

    def student(self, k: int) -> nn.Module:
        """Returns student k (the model for segment k)."""
        return self.students[k]


def json_value(value):
    """Tuples as lists (what a JSON round trip gives back), other values as is."""
    return list(value) if isinstance(value, (list, tuple)) else value


def json_config(model: nn.Module) -> dict:
    """A student's diffusers config as JSON-safe data, private ``_`` keys (class name, version) removed."""
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(cfg, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def class_name(model: nn.Module) -> str:
    """``UNet2DModel`` for diffusers classes, else ``module.Class`` so that it can be re-imported."""
    cls = type(model)
    if getattr(diffusers, cls.__name__, None) is cls:
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_class(name: str) -> type:
    """The class :func:`class_name` recorded."""
    if "." in name:
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    return getattr(diffusers, name)


def take_rows(value, idx: torch.Tensor, batch: int):
    """Rows ``idx`` of a per-sample tensor (leading dim == batch), recursing into dicts, lists and tuples; other
    values as is."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value.index_select(0, idx)
    if isinstance(value, dict):
        return {k: take_rows(v, idx, batch) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(take_rows(v, idx, batch) for v in value)
    return value


def check_shared(students: Sequence[nn.Module], keys: Sequence[str], who: str) -> None:
    """ValueError unless every student has the same value for each config key in ``keys``."""
    for key in keys:
        values = [json.dumps(s.config.get(key)) for s in students]
        if len(set(values)) > 1:
            raise ValueError(f"{who}: students disagree on {key} ({values}); they must match")


def build_students(students, student_configs, student_classes, segments: Segments, who: str,
                   default_class: str) -> list:
    """The students as a list: given, or rebuilt from their configs (``from_config`` / ``from_pretrained``); a
    module passed twice is copied (shared tensors cannot be saved by safetensors)."""
    import copy

    if students is None:
        if student_configs is None:
            raise ValueError(f"{who}: pass `students` (a list of models) or `student_configs`")
        classes = student_classes or [default_class] * len(student_configs)
        students = [resolve_class(c).from_config(cfg) for c, cfg in zip(classes, student_configs)]
    students = list(students)
    if len(students) != segments.n:
        raise ValueError(
            f"{who}: got {len(students)} students for {segments.n} segments "
            f"(boundaries {list(segments.boundaries)}); give one student per segment"
        )
    seen: set[int] = set()
    for k, s in enumerate(students):
        if id(s) in seen:
            students[k] = copy.deepcopy(s)
        seen.add(id(s))
    return students


def route(segments: Segments, batch: int, device, timestep,
          call: Callable[[int, torch.Tensor | None, object], torch.Tensor]) -> torch.Tensor:
    """Runs each batch element on the student owning its timestep and gathers the outputs.

    Args:
        segments: the students' segments (float timesteps route exactly, see :meth:`Segments.owner`).
        batch: B.
        device: the samples' device.
        timestep: a number, a 0-d / 1-element tensor, or a (B,) tensor.
        call: ``call(k, idx, t)`` runs student k on rows ``idx`` (None: the whole batch, ``t`` the timestep as
            given, untouched) with timesteps ``t`` and returns its output (B_k, ...).
    Returns:
        The outputs (B, ...), row i from the owner of ``timestep[i]``.
    Raises:
        ValueError: a timestep tensor that is neither one value nor shape (B,).
    """
    if not torch.is_tensor(timestep):  # a plain number (what most schedulers' loops give): no tensor work
        return call(segments.owner(timestep), None, timestep)
    if timestep.numel() == 1:
        return call(segments.owner(timestep.reshape(()).item()), None, timestep)
    if timestep.ndim != 1 or timestep.shape[0] != batch:
        raise ValueError(f"timestep: expected a scalar or shape ({batch},), got shape {tuple(timestep.shape)}")
    t = timestep.to(device)
    owners = segments.owner(t)  # (B,)
    ks = owners.unique().tolist()
    if len(ks) == 1:  # one owner: pass the timestep through untouched (bit-exact with a plain model)
        return call(ks[0], None, timestep)
    out = None
    for k in ks:
        idx = (owners == k).nonzero(as_tuple=True)[0]  # (B_k,)
        y = call(k, idx, t.index_select(0, idx))
        if out is None:
            out = y.new_empty((batch, *y.shape[1:]))
        out[idx] = y
    return out
