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

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from o2mkd_ray.core.segments import Segments
from o2mkd_ray.pipelines.acceleration import Acceleration, accelerate_students, to_layout
from o2mkd_ray.pipelines.routing import (
    SegmentStudents,
    build_students,
    check_shared,
    class_name,
    json_config,
    json_value,
    route,
    take_rows,
)

# config keys every student must agree on (the pipeline feeds all of them the same latents/conditioning)
_SHARED_KEYS = ("in_channels", "out_channels", "sample_size", "time_cond_proj_dim", "cross_attention_dim",
                "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")


class MultiStudentUNet(SegmentStudents, ModelMixin, ConfigMixin):
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
        students = build_students(students, student_configs, student_classes, segments, "MultiStudentUNet",
                                  "UNet2DModel")
        lo, hi = (float(v) for v in value_range)
        if not lo < hi:
            raise ValueError(
                f"MultiStudentUNet: value_range must be (lo, hi) with lo < hi, got {value_range}"
            )
        first = students[0].config
        check_shared(students, _SHARED_KEYS, "MultiStudentUNet")

        self.students = nn.ModuleList(students)
        sample_size = first.get("sample_size")
        self.register_to_config(
            boundaries=list(segments.boundaries),
            student_configs=[json_config(s) for s in students],
            student_classes=[class_name(s) for s in students],
            value_range=[lo, hi],
            sample_size=list(sample_size) if isinstance(sample_size, (list, tuple)) else sample_size,
            in_channels=first.get("in_channels"),
            out_channels=first.get("out_channels"),
            # UNet2DModel students have neither key: None, which is what StableDiffusionPipeline expects
            time_cond_proj_dim=first.get("time_cond_proj_dim"),
            cross_attention_dim=json_value(first.get("cross_attention_dim")),
            # SDXL's added conditioning (None for SD 1.x/2.x and UNet2DModel students)
            addition_embed_type=first.get("addition_embed_type"),
            addition_time_embed_dim=first.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=first.get("projection_class_embeddings_input_dim"),
        )
        self._segments = segments
        self._accel = Acceleration()
        self._runners: list | None = None  # what forward calls per student; None: the students themselves

    @property
    def add_embedding(self) -> nn.Module | None:
        """The first student's added-conditioning embedding (SDXL's ``text_time``; None without one). All students
        take the same added conditioning (checked at construction); ``StableDiffusionXLPipeline`` reads
        ``unet.add_embedding.linear_1.in_features`` to check the size of its time ids."""
        return getattr(self.students[0], "add_embedding", None)

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

        def call(k: int, idx, t):
            if idx is None:
                return run[k](sample, t, *args, return_dict=False, **kwargs)[0]
            sub_args = [take_rows(a, idx, B) for a in args]
            sub_kwargs = {name: take_rows(v, idx, B) for name, v in kwargs.items()}
            return run[k](sample.index_select(0, idx), t, *sub_args, return_dict=False, **sub_kwargs)[0]

        eps = route(self._segments, B, sample.device, timestep, call)  # (B, C_out, H, W)
        if not return_dict:
            return (eps,)
        return UNet2DOutput(sample=eps)
