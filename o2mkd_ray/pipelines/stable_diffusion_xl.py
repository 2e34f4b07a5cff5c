"""O2MKDStableDiffusionXLPipeline: SDXL text-to-image sampling with one student UNet per timestep segment.

A subclass of diffusers' ``StableDiffusionXLPipeline`` whose ``unet`` is a :class:`MultiStudentUNet` of SDXL
UNets (``addition_embed_type="text_time"``): both text encoders, both tokenizers and the VAE are the teacher's, the
denoising loop is diffusers' own (prompts and ``prompt_2``, negative prompts, classifier-free guidance, the
size/crop time ids, any scheduler), and each step runs on the student owning its timestep, which also receives the
step's ``added_cond_kwargs`` (pooled text ``text_embeds`` and ``time_ids``). With one student equal to the
teacher's UNet the images are bit-identical to ``StableDiffusionXLPipeline``'s. ``steps_per_segment`` gives each
segment its own step budget.

Example::

    pipe = O2MKDStableDiffusionXLPipeline.from_teacher("path/to/sdxl", MultiStudentUNet(students, boundaries))
    image = pipe("a red bicycle", num_inference_steps=25, guidance_scale=5.0).images[0]
    pipe.save_pretrained("o2mkd-sdxl")  # vae/ text_encoder(_2)/ tokenizer(_2)/ unet/ scheduler/ model_index.json
    pipe = O2MKDStableDiffusionXLPipeline.from_pretrained("o2mkd-sdxl")
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from o2mkd_ray.pipelines.acceleration import AcceleratesStudents
from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet
from o2mkd_ray.pipelines.saved import ImportsRecordedModules
from o2mkd_ray.pipelines.segment_steps import SegmentSteps, fresh, load_teacher_parts

SDXL_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class O2MKDStableDiffusionXLPipeline(
    ImportsRecordedModules, AcceleratesStudents, SegmentSteps, StableDiffusionXLPipeline
):
    """Stable Diffusion XL with a :class:`MultiStudentUNet` in place of the UNet.

    Args:
        vae: the teacher's ``AutoencoderKL``.
        text_encoder: the teacher's first CLIP text encoder (penultimate hidden states (B, L, D1)).
        text_encoder_2: the teacher's ``CLIPTextModelWithProjection`` (hidden states (B, L, D2) and the pooled,
            projected text (B, P) that goes into ``added_cond_kwargs["text_embeds"]``).
        tokenizer, tokenizer_2: the teacher's tokenizers.
        unet: a :class:`MultiStudentUNet` of SDXL ``UNet2DConditionModel`` students (``cross_attention_dim`` ==
            D1 + D2, ``addition_embed_type="text_time"``); its boundaries must end at the scheduler's
            ``num_train_timesteps``.
        scheduler: any diffusers scheduler (Euler, DDIM, DPMSolverMultistep, ...); used as given.
        image_encoder, feature_extractor: optional, as in ``StableDiffusionXLPipeline`` (IP-Adapter).
        force_zeros_for_empty_prompt: as in ``StableDiffusionXLPipeline`` (SDXL base: True).
        add_watermarker: False by default (O2MKD compares students with the teacher; a watermark would only
            perturb the images).
    Raises:
        TypeError: ``unet`` is not a :class:`MultiStudentUNet`.
        ValueError: its students lack SDXL's ``text_time`` added conditioning.
    """

    students_component = "unet"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: MultiStudentUNet,
        scheduler: SchedulerMixin,
        image_encoder: torch.nn.Module | None = None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = False,
    ):
        if unet is not None:
            if not isinstance(unet, MultiStudentUNet):
                raise TypeError(
                    "O2MKDStableDiffusionXLPipeline: unet must be a MultiStudentUNet, got "
                    f"{type(unet).__name__}; wrap a single UNet as "
                    "MultiStudentUNet([unet], boundaries=[0, 1000])"
                )
            if unet.config.get("addition_embed_type") != "text_time":
                raise ValueError(
                    "O2MKDStableDiffusionXLPipeline: the students take no SDXL added conditioning "
                    f"(addition_embed_type={unet.config.get('addition_embed_type')!r}, classes "
                    f"{unet.config.student_classes}); SDXL needs UNet2DConditionModel students with "
                    "addition_embed_type='text_time' (use O2MKDStableDiffusionPipeline for SD 1.x/2.x)"
                )
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=add_watermarker,
        )

    @classmethod
    def from_teacher(
        cls,
        teacher: StableDiffusionXLPipeline | str | Path,
        students: MultiStudentUNet,
        scheduler: SchedulerMixin | None = None,
    ) -> O2MKDStableDiffusionXLPipeline:
        """The O2MKD pipeline sharing a teacher's VAE, text encoders and tokenizers.

        Args:
            teacher: a ``StableDiffusionXLPipeline`` (its modules are shared, not copied), or a local SDXL folder
                (``vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/``; its UNet is not loaded).
            students: the :class:`MultiStudentUNet` that replaces the teacher's UNet.
            scheduler: the sampling scheduler; default a fresh copy of the teacher's (same class and config).
        Returns:
            The pipeline, with the teacher's ``force_zeros_for_empty_prompt``.
        Raises:
            ConfigError: ``teacher`` is a path that is not a loadable SDXL folder.
        """
        if isinstance(teacher, (str, Path)):
            teacher = cls._load_teacher(teacher)
        if scheduler is None:
            scheduler = fresh(teacher.scheduler)
        return cls(
            vae=teacher.vae,
            text_encoder=teacher.text_encoder,
            text_encoder_2=teacher.text_encoder_2,
            tokenizer=teacher.tokenizer,
            tokenizer_2=teacher.tokenizer_2,
            unet=students,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=teacher.config.get("force_zeros_for_empty_prompt", True),
        )

    @staticmethod
    def _load_teacher(path: str | Path) -> StableDiffusionXLPipeline:
        """An SDXL folder without its UNet (students replace it) and without a watermarker."""
        return load_teacher_parts(StableDiffusionXLPipeline, path, SDXL_COMPONENTS, "Stable Diffusion XL",
                                  add_watermarker=False)

    @torch.no_grad()
    def __call__(self, *args, steps_per_segment: list[int] | None = None, **kwargs):
        """Generates images from prompts; each denoising step runs on the student owning its timestep.

        Every argument but ``steps_per_segment`` is ``StableDiffusionXLPipeline.__call__``'s, positional or by
        keyword, same defaults and same random draws (``prompt``, ``prompt_2``, ``height``, ``width``,
        ``num_inference_steps``, ``timesteps``, ``sigmas``, ``guidance_scale`` (5.0), ``negative_prompt``, ...,
        ``output_type``, ``original_size``, ``crops_coords_top_left``, ``target_size``, ...).

        Args:
            steps_per_segment: per-segment step budgets ``[s_0, ..., s_{N-1}]`` (segment 0 = low-noise end),
                mapped to ``sum(s_k)`` custom timesteps by
                :func:`~o2mkd_ray.pipelines.unconditional.segment_timesteps`; needs a scheduler whose
                ``set_timesteps`` accepts ``timesteps`` (Euler, DPM-Solver, DDPM, ...; not DDIM or PNDM).
                Excludes ``timesteps`` and ``sigmas``.
        Returns:
            ``StableDiffusionXLPipelineOutput(images=...)`` or ``(images,)``, as diffusers'.
        Raises:
            ValueError: bad ``steps_per_segment``, a scheduler that cannot take them, both it and
                ``timesteps``/``sigmas``, or boundaries that do not end at the scheduler's
                ``num_train_timesteps``.
        """
        self._check_timestep_range()
        if steps_per_segment is not None:
            bound = inspect.signature(StableDiffusionXLPipeline.__call__).bind_partial(self, *args, **kwargs)
            if bound.arguments.get("timesteps") is not None or bound.arguments.get("sigmas") is not None:
                raise ValueError("steps_per_segment: give it or `timesteps`/`sigmas`, not both")
            bound.arguments["timesteps"] = self._segment_timesteps(steps_per_segment)
            args, kwargs = bound.args[1:], bound.kwargs
        return super().__call__(*args, **kwargs)
