"""O2MKDPipeline: unconditional sampling with a MultiStudentUNet under any diffusers scheduler.

Follows diffusers' ``DDIMPipeline`` / ``DDPMPipeline`` line by line (same noise draw, same scheduler calls),
so with one student equal to a UNet the images are bit-identical to theirs; unlike ``DDIMPipeline`` the
scheduler is kept as given (DDPM, DDIM, DPM-Solver, PNDM, Euler, ...).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from o2mkd_ray.pipelines.acceleration import AcceleratesStudents
from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet
from o2mkd_ray.pipelines.saved import ImportsRecordedModules


@functools.cache
def _params(cls: type, method: str) -> frozenset[str]:
    """Parameter names of ``cls.method`` (cached: inspect is slow and is asked once per step)."""
    return frozenset(inspect.signature(getattr(cls, method)).parameters)


def segment_timesteps(boundaries, steps_per_segment) -> list[int]:
    """Descending timesteps with ``s_k`` evenly spaced steps inside each ``[b_k, b_{k+1})``.

    Spacing is "trailing": each segment's steps start at ``b_{k+1} - 1``, so sampling starts at ``T - 1``.

    Args:
        boundaries: ``[0, b_1, ..., T]``.
        steps_per_segment: ``[s_0, ..., s_{N-1}]``, segment 0 being the low-noise end;
            ``1 <= s_k <= b_{k+1} - b_k``.
    Returns:
        ``sum(s_k)`` distinct ints, strictly descending.
    """
    n = len(boundaries) - 1
    steps = list(steps_per_segment)
    if len(steps) != n:
        raise ValueError(
            f"steps_per_segment: got {len(steps)} values for {n} segments; give one step count per segment"
        )
    timesteps: list[int] = []
    for k in reversed(range(n)):
        lo, hi, s = boundaries[k], boundaries[k + 1], steps[k]
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= s <= hi - lo:
            raise ValueError(
                f"steps_per_segment[{k}]: must be an integer in [1, {hi - lo}] for segment [{lo}, {hi}), "
                f"got {s!r}"
            )
        # integer spacing (hi - lo) / s >= 1 keeps the steps distinct and inside the segment
        timesteps += [hi - 1 - (i * (hi - lo)) // s for i in range(s)]
    return timesteps


class O2MKDPipeline(ImportsRecordedModules, AcceleratesStudents, DiffusionPipeline):
    """Pipeline for image generation with one student per timestep segment.

    Args:
        students: a :class:`MultiStudentUNet` (routes each step to the student owning its timestep).
        scheduler: any diffusers scheduler with ``set_timesteps`` and ``step``; used as given.
    """

    model_cpu_offload_seq = "students"

    def __init__(self, students: MultiStudentUNet, scheduler: SchedulerMixin):
        super().__init__()
        self.register_modules(students=students, scheduler=scheduler)


    def _set_timesteps(self, num_inference_steps: int, steps_per_segment, device) -> None:
        sched = type(self.scheduler)
        device_kw = {"device": device} if "device" in _params(sched, "set_timesteps") else {}
        if steps_per_segment is None:
            self.scheduler.set_timesteps(num_inference_steps, **device_kw)
            return
        timesteps = segment_timesteps(self.students.config.boundaries, steps_per_segment)
        if "timesteps" not in _params(sched, "set_timesteps"):
            raise ValueError(
                "steps_per_segment needs a scheduler whose set_timesteps accepts custom `timesteps`, such as"
                f" DDPMScheduler or DPMSolverMultistepScheduler; {sched.__name__} does not. Swap it with"
                " pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)"
            )
        self.scheduler.set_timesteps(timesteps=timesteps, **device_kw)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        steps_per_segment: list[int] | None = None,
        latents: torch.Tensor | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generates images.

        Long only by its diffusers-style signature and argument list (as ``DDIMPipeline.__call__``); the loop is
        short.

        Args:
            batch_size: number of images.
            generator: a torch.Generator (or one per image) for reproducible noise.
            num_inference_steps: denoising steps (ignored when ``steps_per_segment`` is given).
            eta: DDIM's eta (0 = DDIM, 1 = DDPM-like); passed only to schedulers whose ``step`` accepts it.
            output_type: ``"pil"``, ``"np"`` (B, H, W, C) float array in [0, 1], or ``"pt"`` (B, C, H, W).
            return_dict: return ``ImagePipelineOutput`` rather than a tuple.
            steps_per_segment: per-segment step budgets ``[s_0, ..., s_{N-1}]`` (segment 0 = low-noise
                end); needs a scheduler whose ``set_timesteps`` accepts ``timesteps`` (DDPM, DPM-Solver, ...).
            latents: initial noise of shape (B, C, H, W) instead of drawing it from ``generator``.
        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``.
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type: must be 'pil', 'np' or 'pt', got {output_type!r}")
        cfg = self.students.config
        size = cfg.sample_size
        image_shape = (batch_size, cfg.in_channels, *((size, size) if isinstance(size, int) else size))

        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(
                f"You have passed a list of generators of length {len(generator)}, but requested an effective"
                f" batch size of {batch_size}. Make sure the batch size matches the length of the generators."
            )
        device = self._execution_device
        if latents is None:
            image = randn_tensor(image_shape, generator=generator, device=device, dtype=self.students.dtype)
        else:
            if tuple(latents.shape) != image_shape:
                raise ValueError(f"latents: expected shape {image_shape}, got {tuple(latents.shape)}")
            image = latents.to(device=device, dtype=self.students.dtype)
        image = (
            image * self.scheduler.init_noise_sigma
        )  # (B, C, H, W); 1.0 for DDPM/DDIM, sigma_max for Euler

        self._set_timesteps(num_inference_steps, steps_per_segment, device)
        sched = type(self.scheduler)
        step_params = _params(sched, "step")
        step_kwargs = {}
        if "eta" in step_params:
            step_kwargs["eta"] = eta
        if "generator" in step_params:
            step_kwargs["generator"] = generator
        scale = getattr(self.scheduler, "scale_model_input", None)

        for t in self.progress_bar(self.scheduler.timesteps):
            x_t = scale(image, t) if scale is not None else image
            eps = self.students(x_t, t).sample  # (B, C, H, W), from the student owning t
            image = self.scheduler.step(eps, t, image, **step_kwargs).prev_sample

        lo, hi = cfg.value_range
        image = ((image - lo) / (hi - lo)).clamp(0, 1)  # == image / 2 + 0.5 for [-1, 1]
        if output_type != "pt":
            image = image.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                image = self.numpy_to_pil(image)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
