"""MultiStudentTransformer: K student transformers plus the segment boundaries; each call runs on the student that
owns its timestep.

The transformer counterpart of :class:`~o2mkd_ray.pipelines.multi_unet.MultiStudentUNet` for diffusers'
transformer denoisers: ``DiTTransformer2DModel`` (class-conditional, ``DiTPipeline``) and ``SD3Transformer2DModel``
(MMDiT, ``StableDiffusion3Pipeline``), or any other whose forward takes ``timestep`` and ``return_dict``. Each
student is called with its own forward signature (DiT: ``timestep``, ``class_labels``; SD3:
``encoder_hidden_states``, ``pooled_projections``, ``timestep``, ``joint_attention_kwargs``), positional arguments
bound by name as the students' forward names them; for a mixed-timestep batch every per-sample argument is sliced
along with the batch. It saves to one folder (``config.json`` with every student's config, one safetensors file)
and loads back with ``from_pretrained``.

Time axis: the boundaries live on the scheduler's training time axis ``[0, num_train_timesteps]`` and routing uses
the very timestep the transformer receives. For DDPM-style schedulers (DiT) that is an integer step; for
``FlowMatchEulerDiscreteScheduler`` (SD3) it is the float ``1000 * sigma`` after the shift (e.g. 900.22), so the
shift moves which steps a student takes, never which student a given t belongs to. ``t`` in ``[b_k, b_{k+1})``
goes to student k, a value exactly on a boundary to the segment starting there, and ``t == T`` (the first step of a
flow-matching run, sigma = 1) to the last student (:meth:`~o2mkd_ray.core.segments.Segments.owner`).
"""

from __future__ import annotations

import inspect

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from o2mkd_ray.core.segments import Segments
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

# config keys the pipelines read or feed identically to every student
_SHARED_KEYS = ("in_channels", "out_channels", "sample_size", "patch_size", "joint_attention_dim",
                "pooled_projection_dim", "num_embeds_ada_norm")


class MultiStudentTransformer(SegmentStudents, ModelMixin, ConfigMixin):
    """K transformer students, student k used for timesteps in ``[b_k, b_{k+1})``.

    Args:
        students: K diffusers transformers of one forward signature (None when rebuilding from
            ``student_configs``, as ``from_config`` / ``from_pretrained`` do). Students may differ in depth and
            heads, not in the inputs and outputs listed in ``_SHARED_KEYS``.
        boundaries: ``[0, b_1, ..., T]`` with K segments, T the scheduler's ``num_train_timesteps``.
        student_configs: each student's diffusers config (only used when ``students`` is None).
        student_classes: each student's class name (``"DiTTransformer2DModel"`` or ``"module.Class"``).
        sample_size, patch_size, in_channels, out_channels, joint_attention_dim, pooled_projection_dim,
            num_embeds_ada_norm: recorded from the first student, as the pipelines read them from ``config``
            (``DiTPipeline``: ``sample_size``, ``in_channels``, ``out_channels``; ``StableDiffusion3Pipeline``:
            ``sample_size``, ``patch_size``, ``in_channels``, ``joint_attention_dim``); accepted here only so that a
            saved config loads back silently.
    Raises:
        ValueError: no students, one count of students and another of segments, or students that disagree on a
            shared key.
    """

    def __init__(
        self,
        students: list[nn.Module] | None = None,
        boundaries=(0, 1000),
        student_configs: list[dict] | None = None,
        student_classes: list[str] | None = None,
        sample_size=None,
        patch_size: int | None = None,
        in_channels: int | None = None,
        out_channels: int | None = None,
        joint_attention_dim: int | None = None,
        pooled_projection_dim: int | None = None,
        num_embeds_ada_norm: int | None = None,
    ):
        super().__init__()
        segments = Segments(boundaries)
        students = build_students(students, student_configs, student_classes, segments,
                                  "MultiStudentTransformer", "DiTTransformer2DModel")
        check_shared(students, _SHARED_KEYS, "MultiStudentTransformer")
        first = students[0]
        signature = inspect.signature(type(first).forward)
        if "timestep" not in signature.parameters or "return_dict" not in signature.parameters:
            raise ValueError(f"MultiStudentTransformer: {type(first).__name__}.forward takes no `timestep` or "
                             "`return_dict`; students must be diffusers transformer denoisers")
        self.students = nn.ModuleList(students)
        self.register_to_config(
            boundaries=list(segments.boundaries),
            student_configs=[json_config(s) for s in students],
            student_classes=[class_name(s) for s in students],
            sample_size=json_value(first.config.get("sample_size")),
            patch_size=first.config.get("patch_size"),
            in_channels=first.config.get("in_channels"),
            # SD3Transformer2DModel may leave out_channels None (then it is in_channels)
            out_channels=first.config.get("out_channels") or first.config.get("in_channels"),
            joint_attention_dim=first.config.get("joint_attention_dim"),
            pooled_projection_dim=first.config.get("pooled_projection_dim"),
            num_embeds_ada_norm=first.config.get("num_embeds_ada_norm"),
        )
        self._segments = segments
        self._signature = signature
        self._sample_name = list(signature.parameters)[1]  # the latents' name (after self)

    def forward(self, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        """The prediction of the student owning each timestep, called with the students' own signature.

        Args:
            hidden_states: latents (B, C, H, W).
            *args, **kwargs: the students' forward arguments, positional ones bound by their names (so
                ``SD3Transformer2DModel``'s ``(hidden_states, encoder_hidden_states, pooled_projections, timestep)``
                order works as DiT's ``(hidden_states, timestep, class_labels)`` does). ``timestep`` is a number, a
                0-d / 1-element tensor (one student runs on the whole batch, the tensor passed untouched) or a (B,)
                tensor (each sample goes to its owner); float timesteps route exactly. Per-sample tensors (leading
                dim B, also inside dicts and lists: ``class_labels``, ``encoder_hidden_states``,
                ``pooled_projections``, ...) are sliced along with the batch.
            return_dict: return ``Transformer2DModelOutput`` rather than a tuple.
        Returns:
            ``Transformer2DModelOutput(sample=out)`` with out (B, out_channels, H, W) (DiT with learned sigma:
            ``2 * in_channels``), or ``(out,)``.
        Raises:
            TypeError: arguments the students' forward does not take.
            ValueError: no ``timestep``, or a timestep tensor neither one value nor shape (B,).
        """
        bound = self._signature.bind(None, hidden_states, *args, **kwargs).arguments  # None stands for self
        bound.pop("self", None)
        bound.pop("return_dict", None)
        extra = bound.pop(next((n for n, p in self._signature.parameters.items()
                                if p.kind is inspect.Parameter.VAR_KEYWORD), "\0"), {})
        bound.update(extra)
        x = bound.pop(self._sample_name)
        timestep = bound.pop("timestep", None)
        if timestep is None:
            raise ValueError("MultiStudentTransformer: no timestep given; the students are routed by it")
        B = x.shape[0]

        def call(k: int, idx, t):
            if idx is None:
                return self.students[k](x, timestep=t, return_dict=False, **bound)[0]
            sub = {name: take_rows(v, idx, B) for name, v in bound.items()}
            return self.students[k](x.index_select(0, idx), timestep=t, return_dict=False, **sub)[0]

        out = route(self._segments, B, x.device, timestep, call)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
