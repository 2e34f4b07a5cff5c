"""O2MKDStableDiffusionPipeline: text-to-image sampling with one student UNet per timestep segment.

A subclass of diffusers' ``StableDiffusionPipeline`` whose ``unet`` is a :class:`MultiStudentUNet`: the text
encoder, tokenizer and VAE are the teacher's, the denoising loop is diffusers' own (prompts, negative prompts,
classifier-free guidance, ``prompt_embeds``, any scheduler), and each step runs on the student owning its
timestep. With one student equal to the teacher's UNet the images are bit-identical to
``StableDiffusionPipeline``'s. ``steps_per_segment`` gives each segment its own step budget.

Example::

    pipe = O2MKDStableDiffusionPipeline.from_teacher("path/to/sd", MultiStudentUNet(students, boundaries))
    image = pipe("a red bicycle", num_inference_steps=25, guidance_scale=7.5).images[0]
    pipe.save_pretrained("o2mkd-sd")  # vae/ text_encoder/ tokenizer/ unet/ scheduler/ model_index.json
    pipe = O2MKDStableDiffusionPipeline.from_pretrained("o2mkd-sd")
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTokenizer

from o2mkd_ray.pipelines.acceleration import AcceleratesStudents
from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet
from o2mkd_ray.pipelines.saved import ImportsRecordedModules
from o2mkd_ray.pipelines.segment_steps import SegmentSteps, fresh, load_teacher_parts


class O2MKDStableDiffusionPipeline(
    ImportsRecordedModules, AcceleratesStudents, SegmentSteps, StableDiffusionPipeline
):
    """Stable Diffusion with a :class:`MultiStudentUNet` in place of the UNet.

    Args:
        vae: the teacher's ``AutoencoderKL`` (latents (B, 4, h, w) <-> images (B, 3, 8h, 8w) for SD 1.x).
        text_encoder: the teacher's CLIP text encoder (prompt embeddings (B, L, D)).
        tokenizer: the teacher's ``CLIPTokenizer`` (L = ``model_max_length``).
        unet: a :class:`MultiStudentUNet` of ``UNet2DConditionModel`` students (``cross_attention_dim`` == D);
            its boundaries must end at the scheduler's ``num_train_timesteps``.
        scheduler: any diffusers scheduler (PNDM, DDIM, DPMSolverMultistep, Euler, ...); used as given.
        safety_checker, feature_extractor, image_encoder: optional, as in ``StableDiffusionPipeline``
            (default None: O2MKD compares students with the teacher, a filter would only hide images).
        requires_safety_checker: False by default (no warning about the missing safety checker).
    Raises:
        TypeError: ``unet`` is not a :class:`MultiStudentUNet`.
        ValueError: its students take no text conditioning (no ``cross_attention_dim``).
    """

    students_component = "unet"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: MultiStudentUNet,
        scheduler: SchedulerMixin,
        safety_checker: torch.nn.Module | None = None,
        feature_extractor=None,
        image_encoder: torch.nn.Module | None = None,
        requires_safety_checker: bool = False,
    ):
        if unet is not None:
            if not isinstance(unet, MultiStudentUNet):
                raise TypeError(
                    "O2MKDStableDiffusionPipeline: unet must be a MultiStudentUNet, got "
                    f"{type(unet).__name__}; wrap a single UNet as "
                    "MultiStudentUNet([unet], boundaries=[0, 1000])"
                )
            if unet.config.get("cross_attention_dim") is None:
                raise ValueError(
                    "O2MKDStableDiffusionPipeline: the students take no text conditioning (no "
                    f"cross_attention_dim; classes {unet.config.student_classes}); Stable Diffusion needs "
                    "UNet2DConditionModel students"
                )
        super().__init__(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            requires_safety_checker=requires_safety_checker,
        )

    @classmethod
    def from_teacher(
        cls,
        teacher: StableDiffusionPipeline | str | Path,
        students: MultiStudentUNet,
        scheduler: SchedulerMixin | None = None,
    ) -> "O2MKDStableDiffusionPipeline":
        """The O2MKD pipeline sharing a teacher's VAE, text encoder and tokenizer.

        Args:
            teacher: a ``StableDiffusionPipeline`` (its modules are shared, not copied), or a local Stable
                Diffusion folder (``vae/ text_encoder/ tokenizer/ scheduler/``; its UNet is not loaded).
            students: the :class:`MultiStudentUNet` that replaces the teacher's UNet.
            scheduler: the sampling scheduler; default a fresh copy of the teacher's (same class and config).
        Returns:
            The pipeline, progress bar settings as diffusers' defaults.
        Raises:
            ConfigError: ``teacher`` is a path that is not a loadable Stable Diffusion folder.
        """
        if isinstance(teacher, (str, Path)):
            teacher = cls._load_teacher(teacher)
        if scheduler is None:
            scheduler = fresh(teacher.scheduler)
        return cls(
            vae=teacher.vae,
            text_encoder=teacher.text_encoder,
            tokenizer=teacher.tokenizer,
            unet=students,
            scheduler=scheduler,
        )

    @staticmethod
    def _load_teacher(path: str | Path) -> StableDiffusionPipeline:
        """A Stable Diffusion folder without its UNet (students replace it) and without safety checker."""
        return load_teacher_parts(StableDiffusionPipeline, path, ("vae", "text_encoder", "tokenizer", "scheduler"),
                                  "Stable Diffusion", safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=False)


    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int | None = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        *,
        steps_per_segment: list[int] | None = None,
        output_type: str | None = "pil",
        return_dict: bool = True,
        **kwargs,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Generates images from prompts; each denoising step runs on the student owning its timestep.

        Long by its signature, which must stay ``StableDiffusionPipeline.__call__``'s for drop-in use.

        Everything but ``steps_per_segment`` is ``StableDiffusionPipeline.__call__``'s (same defaults, same
        random draws); further keyword arguments (``cross_attention_kwargs``, ``guidance_rescale``,
        ``clip_skip``, ``callback_on_step_end``, ...) are passed through.

        Args:
            prompt: a prompt or B prompts (or give ``prompt_embeds``).
            height, width: image size in pixels; default ``sample_size * vae_scale_factor``.
            num_inference_steps: denoising steps (ignored with ``timesteps``, ``sigmas`` or
                ``steps_per_segment``).
            timesteps: custom descending timesteps (schedulers whose ``set_timesteps`` accepts them).
            sigmas: custom sigmas (schedulers whose ``set_timesteps`` accepts them).
            guidance_scale: classifier-free guidance weight; > 1 runs each UNet call on a batch of 2B
                (negative/unconditional + conditional), 1 runs the conditional branch only.
            negative_prompt: what to guide away from (replaces the empty prompt of the unconditional branch).
            num_images_per_prompt: images per prompt (B' = B * num_images_per_prompt).
            eta: DDIM's eta; ignored by schedulers whose ``step`` takes none.
            generator: a ``torch.Generator`` or one per image (B' of them) for reproducible latents.
            latents: initial latents (B', C_lat, height / 8, width / 8) instead of drawing them.
            prompt_embeds: text embeddings (B, L, D) instead of ``prompt``.
            negative_prompt_embeds: negative text embeddings (B, L, D).
            steps_per_segment: per-segment step budgets ``[s_0, ..., s_{N-1}]`` (segment 0 = low-noise end),
                mapped to ``sum(s_k)`` custom timesteps by :func:`~o2mkd_ray.pipelines.unconditional.segment_timesteps`;
                needs a scheduler whose ``set_timesteps`` accepts ``timesteps`` (DDPM, DPM-Solver, Euler, ...;
                not PNDM or DDIM). Excludes ``timesteps`` and ``sigmas``.
            output_type: ``"pil"``, ``"np"`` ((B', H, W, 3) float in [0, 1]), ``"pt"`` ((B', 3, H, W)) or
                ``"latent"`` ((B', C_lat, H / 8, W / 8)).
            return_dict: return ``StableDiffusionPipelineOutput`` rather than a tuple.
        Returns:
            ``StableDiffusionPipelineOutput(images=..., nsfw_content_detected=None)`` (no safety checker), or
            ``(images, nsfw_content_detected)``.
        Raises:
            ValueError: bad ``steps_per_segment``, a scheduler that cannot take them, both it and
                ``timesteps``/``sigmas``, or boundaries that do not end at the scheduler's
                ``num_train_timesteps``.
        """
        self._check_timestep_range()
        if steps_per_segment is not None:
            if timesteps is not None or sigmas is not None:
                raise ValueError("steps_per_segment: give it or `timesteps`/`sigmas`, not both")
            timesteps = self._segment_timesteps(steps_per_segment)
        return super().__call__(
            prompt=prompt,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            timesteps=timesteps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            negative_prompt=negative_prompt,
            num_images_per_prompt=num_images_per_prompt,
            eta=eta,
            generator=generator,
            latents=latents,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            output_type=output_type,
            return_dict=return_dict,
            **kwargs,
        )
