"""O2MKDDiTPipeline: class-conditional sampling with one student DiT per timestep segment.

A subclass of diffusers' ``DiTPipeline`` whose ``transformer`` is a :class:`MultiStudentTransformer` of
``DiTTransformer2DModel`` students: the VAE and the class names are the teacher's, the denoising loop is diffusers'
own (class labels, classifier-free guidance against the null class, learned sigma, any scheduler), and each step
runs on the student owning its timestep. With one student equal to the teacher's transformer the images are
bit-identical to ``DiTPipeline``'s.

Example::

    pipe = O2MKDDiTPipeline.from_teacher("path/to/dit", MultiStudentTransformer(students, [0, 300, 700, 1000]))
    images = pipe(class_labels=[207, 360], num_inference_steps=25, guidance_scale=4.0).images
    pipe.save_pretrained("o2mkd-dit")  # vae/ transformer/ scheduler/ model_index.json
    pipe = O2MKDDiTPipeline.from_pretrained("o2mkd-dit")
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiTPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from o2mkd_ray.pipelines.multi_transformer import MultiStudentTransformer
from o2mkd_ray.pipelines.saved import ImportsRecordedModules
from o2mkd_ray.pipelines.segment_steps import SegmentSteps, fresh, load_teacher_parts


def id2label_of(pipe: DiTPipeline) -> dict[int, str] | None:
    """``DiTPipeline``'s ``id2label`` back from its ``labels`` (name -> id; several names per id joined by ", ")."""
    out: dict[int, list[str]] = {}
    for name, k in pipe.labels.items():
        out.setdefault(int(k), []).append(name)
    return {k: ", ".join(v) for k, v in sorted(out.items())} or None


class O2MKDDiTPipeline(ImportsRecordedModules, SegmentSteps, DiTPipeline):
    """DiT with a :class:`MultiStudentTransformer` in place of the transformer.

    Args:
        transformer: a :class:`MultiStudentTransformer` of ``DiTTransformer2DModel`` students; its boundaries must
            end at the scheduler's ``num_train_timesteps``.
        vae: the teacher's ``AutoencoderKL``.
        scheduler: any diffusers scheduler (DDIM, DPMSolverMultistep, ...); used as given.
        id2label: class id -> comma-separated names, as ``DiTPipeline`` (``pipe.get_label_ids("goldfish")``).
    Raises:
        TypeError: ``transformer`` is not a :class:`MultiStudentTransformer`.
        ValueError: its students take no class labels (no ``num_embeds_ada_norm``).
    """

    students_component = "transformer"

    def __init__(self, transformer: MultiStudentTransformer, vae: AutoencoderKL, scheduler: SchedulerMixin,
                 id2label: dict[int, str] | None = None):
        if transformer is not None:
            if not isinstance(transformer, MultiStudentTransformer):
                raise TypeError(
                    "O2MKDDiTPipeline: transformer must be a MultiStudentTransformer, got "
                    f"{type(transformer).__name__}; wrap a single DiT as "
                    "MultiStudentTransformer([transformer], boundaries=[0, 1000])"
                )
            if transformer.config.get("num_embeds_ada_norm") is None:
                raise ValueError(
                    "O2MKDDiTPipeline: the students take no class labels (no num_embeds_ada_norm; classes "
                    f"{transformer.config.student_classes}); DiT needs DiTTransformer2DModel students"
                )
        super().__init__(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
        if id2label is not None:  # saved in model_index.json (DiTPipeline drops it), as the hub's DiT folders do
            self.register_to_config(id2label={str(k): v for k, v in id2label.items()})

    @classmethod
    def from_teacher(cls, teacher: DiTPipeline | str | Path, students: MultiStudentTransformer,
                     scheduler: SchedulerMixin | None = None) -> O2MKDDiTPipeline:
        """The O2MKD pipeline sharing a teacher's VAE and class names.

        Args:
            teacher: a ``DiTPipeline`` (its modules are shared, not copied), or a local DiT folder (``vae/
                scheduler/ model_index.json``; its transformer is not loaded).
            students: the :class:`MultiStudentTransformer` that replaces the teacher's transformer.
            scheduler: the sampling scheduler; default a fresh copy of the teacher's (same class and config).
        Returns:
            The pipeline.
        Raises:
            ConfigError: ``teacher`` is a path that is not a loadable DiT folder.
        """
        if isinstance(teacher, (str, Path)):
            teacher = load_teacher_parts(DiTPipeline, teacher, ("vae", "scheduler"), "DiT", denoiser="transformer")
        if scheduler is None:
            scheduler = fresh(teacher.scheduler)
        return cls(transformer=students, vae=teacher.vae, scheduler=scheduler, id2label=id2label_of(teacher))

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """Generates images of the given classes; each denoising step runs on the student owning its timestep.

        Every argument is ``DiTPipeline.__call__``'s, positional or by keyword, same defaults and same random draws
        (``class_labels``, ``guidance_scale`` (4.0), ``generator``, ``num_inference_steps``, ``output_type``,
        ``return_dict``).

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``, as diffusers'.
        Raises:
            ValueError: boundaries that do not end at the scheduler's ``num_train_timesteps``.
        """
        self._check_timestep_range()
        return super().__call__(*args, **kwargs)
