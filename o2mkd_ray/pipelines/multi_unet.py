"""MultiStudentUNet: K student UNets plus the segment boundaries; ``forward(x_t, t)`` routes t to its owner.

It is a diffusers ``ModelMixin``, so it saves to one folder (``config.json`` holding every student's config,
and one ``diffusion_pytorch_model.safetensors`` holding all weights under ``students.{k}.``) and loads back
with ``from_pretrained``; any diffusers pipeline that calls ``unet(x_t, t).sample`` can use it in place of a
UNet. With ``UNet2DConditionModel`` students it is a drop-in ``unet`` for ``StableDiffusionPipeline``: the
config keys that pipeline reads (``sample_size``, ``in_channels``, ``time_cond_proj_dim``, ...) are recorded
from the first student, and ``encoder_hidden_states`` / ``timestep_cond`` / ``added_cond_kwargs`` are passed
to (and, for mixed-timestep batches, sliced along with) the owning student. With SDXL students
(``addition_embed_type="text_time"``) it is a drop-in ``unet`` for ``StableDiffusionXLPipeline`` too: it records
``addition_time_embed_dim`` and exposes the first student's ``add_embedding`` (both read by that pipeline to check
its added time ids), and ``added_cond_kwargs`` (``text_embeds`` (B, D), ``time_ids`` (B, 6)) is routed per element.
"""

from __future__ import annotations

import copy
import importlib
import json

import diffusers
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from o2mkd_ray.core.segments import Segments
from o2mkd_ray.pipelines.acceleration import Acceleration, accelerate_students, to_layout

# config keys every student must agree on (the pipeline feeds all of them the same latents/conditioning)
_SHARED_KEYS = ("in_channels", "out_channels", "sample_size", "time_cond_proj_dim", "cross_attention_dim",
                "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


def _json_value(value):
    """Tuples as lists (what a JSON round trip gives back), other values as is."""
    return list(value) if isinstance(value, (list, tuple)) else value


def _json_config(model: nn.Module) -> dict:
    """A student's diffusers config as JSON-safe data, private ``_`` keys (class name, version) removed."""
    cfg = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(cfg, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def _class_name(model: nn.Module) -> str:
    """``UNet2DModel`` for diffusers classes, else ``module.Class`` so that it can be re-imported."""
    cls = type(model)
    if getattr(diffusers, cls.__name__, None) is cls:
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_class(name: str) -> type:
    if "." in name:
        module, _, attr = name.rpartition(".")
        return getattr(importlib.import_module(module), attr)
    return getattr(diffusers, name)


def _take(value, idx: torch.Tensor, batch: int):
    """Rows ``idx`` of a per-sample tensor (leading dim == batch), recursing into dicts; else as is."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value.index_select(0, idx)
    if isinstance(value, dict):
        return {k: _take(v, idx, batch) for k, v in value.items()}
    return value


class MultiStudentUNet(ModelMixin, ConfigMixin):
    """K students, student k used for timesteps in ``[b_k, b_{k+1})``.

    Args:
        students: K diffusers models (normally ``UNet2DModel``; ``UNet2DConditionModel`` works too). None when
            rebuilding from ``student_configs`` (what ``from_config`` / ``from_pretrained`` do).
        boundaries: ``[0, b_1, ..., T]`` with K segments.
        student_configs: each student's diffusers config (only used when ``students`` is None).
        student_classes: each student's class name (``"UNet2DModel"`` or ``"module.Class"``).
        value_range: ``(lo, hi)`` of the data the teacher was trained on; the pipeline maps outputs to [0, 1].
        sample_size, in_channels, out_channels, time_cond_proj_dim, cross_attention_dim, addition_embed_type,
            addition_time_embed_dim, projection_class_embeddings_input_dim: recorded from the first student
            (pipelines read them from ``config``: ``StableDiffusionPipeline`` reads ``sample_size``,
            ``in_channels`` and ``time_cond_proj_dim``, ``StableDiffusionXLPipeline`` also
            ``addition_time_embed_dim``); accepted here only so that loading a saved config passes them back
            silently. Configs saved before some of them were recorded load too (the values are re-derived from
            the students).
    """

    def __init__(
        self,
        students: list[nn.Module] | None = None,
        boundaries=(0, 1000),
        student_configs: list[dict] | None = None,
        student_classes: list[str] | None = None,
        value_range=(-1.0, 1.0),
        sample_size=None,
        in_channels: int | None = None,
        out_channels: int | None = None,
        time_cond_proj_dim: int | None = None,
        cross_attention_dim=None,
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        projection_class_embeddings_input_dim: int | None = None,
    ):
        super().__init__()
        segments = Segments(boundaries)
        if students is None:
            if student_configs is None:
                raise ValueError("MultiStudentUNet: pass `students` (a list of models) or `student_configs`")
            classes = student_classes or ["UNet2DModel"] * len(student_configs)
            students = [_resolve_class(c).from_config(cfg) for c, cfg in zip(classes, student_configs)]
        students = list(students)
        if len(students) != segments.n:
            raise ValueError(
                f"MultiStudentUNet: got {len(students)} students for {segments.n} segments "
                f"(boundaries {list(segments.boundaries)}); give one student per segment"
            )
        seen: set[int] = set()
        for k, s in enumerate(students):
            # the same module passed twice would share tensors, which safetensors refuses to save
            if id(s) in seen:
                students[k] = copy.deepcopy(s)
            seen.add(id(s))
        lo, hi = (float(v) for v in value_range)
        if not lo < hi:
            raise ValueError(
                f"MultiStudentUNet: value_range must be (lo, hi) with lo < hi, got {value_range}"
            )
        first = students[0].config
        for key in _SHARED_KEYS:
            values = [json.dumps(s.config.get(key)) for s in students]
            if len(set(values)) > 1:
                raise ValueError(f"MultiStudentUNet: students disagree on {key} ({values}); they must match")

        self.students = nn.ModuleList(students)
        sample_size = first.get("sample_size")
        self.register_to_config(
            boundaries=list(segments.boundaries),
            student_configs=[_json_config(s) for s in students],
            student_classes=[_class_name(s) for s in students],
            value_range=[lo, hi],
            sample_size=list(sample_size) if isinstance(sample_size, (list, tuple)) else sample_size,
            in_channels=first.get("in_channels"),
            out_channels=first.get("out_channels"),
            # UNet2DModel students have neither key: None, which is what StableDiffusionPipeline expects
            time_cond_proj_dim=first.get("time_cond_proj_dim"),
            cross_attention_dim=_json_value(first.get("cross_attention_dim")),
            # SDXL's added conditioning (None for SD 1.x/2.x and UNet2DModel students)
            addition_embed_type=first.get("addition_embed_type"),
            addition_time_embed_dim=first.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=first.get("projection_class_embeddings_input_dim"),
        )
        self._segments = segments
        self._accel = Acceleration()
        self._runners: list | None = None  # what forward calls per student; None: the students themselves

    @property
    def segments(self) -> Segments:
        return self._segments

    @property
    def add_embedding(self) -> nn.Module | None:
        """The first student's added-conditioning embedding (SDXL's ``text_time``; None without one). All students
        take the same added conditioning (checked at construction); ``StableDiffusionXLPipeline`` reads
        ``unet.add_embedding.linear_1.in_features`` to check the size of its time ids."""
        return getattr(self.students[0], "add_embedding", None)

    @property
    def num_students(self) -> int:
        return len(self.students)

    def student(self, k: int) -> nn.Module:
        """Returns student k (the model for segment k)."""
        return self.students[k]

    def _each_student(self, method: str, *args, **kwargs) -> None:
        """Calls ``student.method(*args, **kwargs)`` on every student that has it (UNet2DModel lacks some)."""
        found = False
        for s in self.students:
            fn = getattr(s, method, None)
            if fn is not None:
                fn(*args, **kwargs)
                found = True
        if not found:
            raise AttributeError(
                f"MultiStudentUNet: no student has {method}() ({self.config.student_classes})"
            )

    def set_attention_slice(self, slice_size) -> None:
        """Sliced attention in every student (what ``pipe.enable_attention_slicing(slice_size)`` calls)."""
        self._each_student("set_attention_slice", slice_size)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU in every student (what ``pipe.enable_freeu(...)`` calls)."""
        self._each_student("enable_freeu", s1=s1, s2=s2, b1=b1, b2=b2)

    def disable_freeu(self) -> None:
        """Undoes :meth:`enable_freeu`."""
        self._each_student("disable_freeu")

    @property
    def acceleration(self) -> Acceleration:
        """The run-time options :meth:`accelerate` set (``Acceleration()`` when none)."""
        return self._accel

    def accelerate(self, compile: bool = False, channels_last: bool = False, compile_kwargs: dict | None = None):
        """Speeds up sampling with every student at once; ``accelerate()`` with no options undoes it.

        Nothing is saved: weights, config and ``save_pretrained`` output stay as without it.

        Args:
            compile: wrap each student in its own ``torch.compile`` (``dynamic=False`` by default: one graph per
                student and batch shape; moving to the next student never recompiles the previous one).
            channels_last: students' weights and inputs in ``torch.channels_last`` layout (NHWC convolutions).
            compile_kwargs: further ``torch.compile`` arguments (``mode="reduce-overhead"`` for CUDA graphs on
                GPU, ``backend=...``).
        Returns:
            self, so that ``pipe.students = pipe.students.accelerate(...)`` reads as diffusers' idiom.
        """
        self._accel = Acceleration(compile, channels_last, dict(compile_kwargs or {}))
        runners = accelerate_students(list(self.students), self._accel)
        self._runners = runners if compile else None
        return self

    def forward(self, sample: torch.Tensor, timestep, *args, return_dict: bool = True, **kwargs):
        """Predicts eps with the student that owns each timestep.

        Args:
            sample: x_t, shape (B, C, H, W).
            timestep: a number, a 0-d / 1-element tensor (one student runs on the whole batch), or a tensor of
                shape (B,) (each sample goes to its own owner).
            *args, **kwargs: passed to the students (e.g. ``encoder_hidden_states`` (B, L, D),
                ``timestep_cond`` (B, time_cond_proj_dim), ``added_cond_kwargs``, ``cross_attention_kwargs``);
                per-sample tensors (leading dim B, also inside dicts) are sliced along with the batch.
            return_dict: return ``UNet2DOutput`` rather than a tuple.
        Returns:
            ``UNet2DOutput(sample=eps)`` with eps of shape (B, C_out, H, W), or ``(eps,)``.
        """
        B = sample.shape[0]
        run = self._runners if self._runners is not None else self.students
        sample = to_layout(sample, self._accel)
        if not torch.is_tensor(timestep):  # a plain number (what most schedulers' loops give): no tensor work
            k = self._segments.owner(timestep)
        elif timestep.numel() == 1:
            t = timestep
            k = self._segments.owner(t.reshape(()).item())
        else:
            t = timestep
            if t.ndim != 1 or t.shape[0] != B:
                raise ValueError(f"timestep: expected a scalar or shape ({B},), got shape {tuple(t.shape)}")
            owners = self._segments.owner(t.to(sample.device))  # (B,)
            ks = owners.unique().tolist()
            k = ks[0] if len(ks) == 1 else None
        if k is not None:  # one owner: pass the timestep through untouched (bit-exact with a plain UNet)
            eps = run[k](sample, timestep, *args, return_dict=False, **kwargs)[0]
        else:
            t = t.to(sample.device)
            eps = None
            for k in ks:
                idx = (owners == k).nonzero(as_tuple=True)[0]  # (B_k,)
                sub_args = [_take(a, idx, B) for a in args]
                sub_kwargs = {name: _take(v, idx, B) for name, v in kwargs.items()}
                y = run[k](
                    sample.index_select(0, idx),
                    t.index_select(0, idx),
                    *sub_args,
                    return_dict=False,
                    **sub_kwargs,
                )[0]  # (B_k, C_out, H, W)
                if eps is None:
                    eps = y.new_empty((B, *y.shape[1:]))
                eps[idx] = y
        if not return_dict:
            return (eps,)
        return UNet2DOutput(sample=eps)
