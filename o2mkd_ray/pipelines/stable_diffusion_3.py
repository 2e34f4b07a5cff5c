"""O2MKDStableDiffusion3Pipeline: SD3 (MMDiT, flow matching) text-to-image sampling with one student transformer per
timestep segment.

A subclass of diffusers' ``StableDiffusion3Pipeline`` whose ``transformer`` is a :class:`MultiStudentTransformer` of
``SD3Transformer2DModel`` students: the text encoders (T5 optional: without it diffusers feeds zeros), tokenizers
and VAE are the teacher's, the denoising loop is diffusers' own (prompts 1-3, negative prompts, classifier-free
guidance, skip-layer guidance, any flow-matching scheduler), and each step runs on the student owning its timestep.
With one student equal to the teacher's transformer the images are bit-identical to ``StableDiffusion3Pipeline``'s.

Time axis: ``FlowMatchEulerDiscreteScheduler`` gives the transformer ``t = num_train_timesteps * sigma``, floats
after the shift (``shift=3.0`` for SD3 puts most steps at high t). The boundaries are on that axis
``[0, num_train_timesteps]``, and routing uses the same t the transformer receives: the first step (sigma = 1,
t = T) belongs to the last student, a t exactly on a boundary to the segment starting there.

Example::

    pipe = O2MKDStableDiffusion3Pipeline.from_teacher("path/to/sd3", MultiStudentTransformer(students, [0, 500, 1000]))
    image = pipe("a red bicycle", num_inference_steps=28, guidance_scale=7.0).images[0]
    pipe.save_pretrained("o2mkd-sd3")
    pipe = O2MKDStableDiffusion3Pipeline.from_pretrained("o2mkd-sd3", text_encoder_3=None, tokenizer_3=None)
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from o2mkd_ray.pipelines.multi_transformer import MultiStudentTransformer
from o2mkd_ray.pipelines.saved import ImportsRecordedModules
from o2mkd_ray.pipelines.segment_steps import SegmentSteps, fresh, load_teacher_parts

SD3_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class O2MKDStableDiffusion3Pipeline(ImportsRecordedModules, SegmentSteps, StableDiffusion3Pipeline):
    """Stable Diffusion 3 with a :class:`MultiStudentTransformer` in place of the transformer.

    Args:
        transformer: a :class:`MultiStudentTransformer` of ``SD3Transformer2DModel`` students; its boundaries must
            end at the scheduler's ``num_train_timesteps``.
        scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3,
            image_encoder, feature_extractor: as in ``StableDiffusion3Pipeline`` (``text_encoder_3`` /
            ``tokenizer_3`` may be None: T5 embeddings become zeros of width ``joint_attention_dim``).
    Raises:
        TypeError: ``transformer`` is not a :class:`MultiStudentTransformer`.
        ValueError: its students take no joint text attention (no ``joint_attention_dim``).
    """

    students_component = "transformer"

    def __init__(self, transformer: MultiStudentTransformer, scheduler: SchedulerMixin, vae, text_encoder, tokenizer,
                 text_encoder_2, tokenizer_2, text_encoder_3=None, tokenizer_3=None, image_encoder=None,
                 feature_extractor=None):
        if transformer is not None:
            if not isinstance(transformer, MultiStudentTransformer):
                raise TypeError(
                    "O2MKDStableDiffusion3Pipeline: transformer must be a MultiStudentTransformer, got "
                    f"{type(transformer).__name__}; wrap a single SD3 transformer as "
                    "MultiStudentTransformer([transformer], boundaries=[0, 1000])"
                )
            if transformer.config.get("joint_attention_dim") is None:
                raise ValueError(
                    "O2MKDStableDiffusion3Pipeline: the students take no text (no joint_attention_dim; classes "
                    f"{transformer.config.student_classes}); SD3 needs SD3Transformer2DModel students"
                )
        super().__init__(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                         text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, image_encoder=image_encoder,
                         feature_extractor=feature_extractor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As diffusers' (``text_encoder_3`` / ``tokenizer_3`` default to None when the folder has none)."""
        path = Path(str(pretrained_model_name_or_path)).expanduser()
        for part in ("text_encoder_3", "tokenizer_3"):
            if part not in kwargs and path.is_dir() and not (path / part).is_dir():
                kwargs[part] = None
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_teacher(cls, teacher: StableDiffusion3Pipeline | str | Path, students: MultiStudentTransformer,
                     scheduler: SchedulerMixin | None = None) -> O2MKDStableDiffusion3Pipeline:
        """The O2MKD pipeline sharing a teacher's VAE, text encoders and tokenizers.

        Args:
            teacher: a ``StableDiffusion3Pipeline`` (its modules are shared, not copied), or a local SD3 folder
                (``vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/``, T5 optional; its
                transformer is not loaded).
            students: the :class:`MultiStudentTransformer` that replaces the teacher's transformer.
            scheduler: the sampling scheduler; default a fresh copy of the teacher's (same class, config, shift).
        Returns:
            The pipeline.
        Raises:
            ConfigError: ``teacher`` is a path that is not a loadable SD3 folder.
        """
        if isinstance(teacher, (str, Path)):
            p = Path(teacher).expanduser()
            no_t5 = {part: None for part in ("text_encoder_3", "tokenizer_3") if not (p / part).is_dir()}
            teacher = load_teacher_parts(StableDiffusion3Pipeline, p, SD3_COMPONENTS, "Stable Diffusion 3",
                                         denoiser="transformer", **no_t5)
        if scheduler is None:
            scheduler = fresh(teacher.scheduler)
        return cls(transformer=students, scheduler=scheduler, vae=teacher.vae, text_encoder=teacher.text_encoder,
                   tokenizer=teacher.tokenizer, text_encoder_2=teacher.text_encoder_2, tokenizer_2=teacher.tokenizer_2,
                   text_encoder_3=teacher.text_encoder_3, tokenizer_3=teacher.tokenizer_3,
                   image_encoder=getattr(teacher, "image_encoder", None),
                   feature_extractor=getattr(teacher, "feature_extractor", None))

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        """Generates images from prompts; each denoising step runs on the student owning its timestep.

        Every argument is ``StableDiffusion3Pipeline.__call__``'s, positional or by keyword, same defaults and same
        random draws (``prompt``, ``negative_prompt``, ``guidance_scale`` (7.0), ``num_inference_steps``,
        ``sigmas``, ``max_sequence_length``, ``skip_guidance_layers``, ...).

        Returns:
            ``StableDiffusion3PipelineOutput(images=...)`` or ``(images,)``, as diffusers'.
        Raises:
            ValueError: boundaries that do not end at the scheduler's ``num_train_timesteps``.
        """
        self._check_timestep_range()
        return super().__call__(*args, **kwargs)
