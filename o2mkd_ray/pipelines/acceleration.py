"""Run-time acceleration of a MultiStudentUNet's students: ``torch.compile`` and the ``channels_last`` layout.

Nothing here touches the weights' values or the configs: compiled modules wrap the students without replacing
them (``state_dict`` keys and ``save_pretrained`` output stay the same), and ``save_pretrained`` writes
channels_last weights in the default layout (diffusers packs each tensor contiguously before safetensors).
Options off, the students run exactly as diffusers runs a UNet (bit-identical images).

Dynamo keeps at most ``torch._dynamo.config.recompile_limit`` (8) graphs per compiled function, and every UNet of
one class (all students, a teacher of that class in the same process) runs the same ``forward``: one graph per
architecture, memory layout and batch shape counts against it, and past it Dynamo falls back to eager (with a
warning). Raise the limit, or call ``torch._dynamo.reset()``, when sampling at many batch sizes.

GPU-only options are left to the user, as with any diffusers UNet: half precision is
``pipe.to(torch.float16)`` (or ``torch.bfloat16``) before :meth:`MultiStudentUNet.accelerate`, and CUDA graphs
are ``compile_kwargs={"mode": "reduce-overhead"}`` (one graph per student and batch shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Acceleration:
    """What :func:`accelerate_students` applied.

    Args:
        compile: each student runs through its own ``torch.compile`` wrapper.
        channels_last: weights and inputs use ``torch.channels_last``.
        compile_kwargs: passed to ``torch.compile`` (default ``dynamic=False``: one graph per student and
            batch shape, no guard on the timestep's value).
    """

    compile: bool = False
    channels_last: bool = False
    compile_kwargs: dict = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.compile or self.channels_last


def accelerate_students(students: list[nn.Module], options: Acceleration) -> list[nn.Module]:
    """Applies ``options`` to every student and returns the callables ``forward`` should use, one per student.

    Args:
        students: the K student modules (changed in place only in their memory layout).
        options: what to apply; ``Acceleration()`` undoes everything.
    Returns:
        K callables: the students themselves, or ``torch.compile`` wrappers around them (one per student, so
        moving from one student to the next never recompiles the previous one's graph).
    """
    fmt = torch.channels_last if options.channels_last else torch.contiguous_format
    for s in students:
        s.to(memory_format=fmt)
    if not options.compile:
        return list(students)
    kwargs = {"dynamic": False, **options.compile_kwargs}
    return [torch.compile(s, **kwargs) for s in students]


def to_layout(sample: torch.Tensor, options: Acceleration) -> torch.Tensor:
    """The input in the students' layout (a no-op without ``channels_last`` or for non-4-D inputs)."""
    if options.channels_last and sample.ndim == 4:
        return sample.contiguous(memory_format=torch.channels_last)
    return sample


class AcceleratesStudents:
    """Mixin for the O2MKD pipelines: :meth:`accelerate` on the pipeline's :class:`MultiStudentUNet` component,
    named by ``students_component`` (``students`` in the unconditional pipeline, ``unet`` in text-to-image ones)."""

    students_component = "students"

    def accelerate(self, compile: bool = False, channels_last: bool = False, compile_kwargs: dict | None = None):
        """Sampling speed-ups applied to every student at once (see :meth:`MultiStudentUNet.accelerate`);
        ``accelerate()`` undoes them. Nothing is saved with the pipeline.

        Args:
            compile: one ``torch.compile`` wrapper per student.
            channels_last: students' weights and inputs in ``torch.channels_last`` layout.
            compile_kwargs: further ``torch.compile`` arguments.
        Returns:
            self.
        """
        getattr(self, self.students_component).accelerate(compile=compile, channels_last=channels_last,
                                                          compile_kwargs=compile_kwargs)
        return self
