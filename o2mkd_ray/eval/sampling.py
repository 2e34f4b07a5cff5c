"""Sampling for comparison: teacher and students from the same noise and scheduler, image grids, ``samples.png``.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.atomic import replace_file
from o2mkd_ray.core.schedulers import make_scheduler
from o2mkd_ray.eval.measures import image_fidelity


@torch.no_grad()
def teacher_images(model: nn.Module, scheduler, shape, value_range, num_images: int, steps: int, seed: int,
                   eta: float = 0.0) -> np.ndarray:
    """Samples the teacher with the same loop, noise and scheduler as O2MKDPipeline (``(N, H, W, C)`` in [0, 1]).

    The model's output is handed to ``scheduler.step`` raw: a scheduler built from the teacher's config reads it as
    that config's ``prediction_type`` (ε, v or x_0).
    """
    import inspect

    from diffusers.utils.torch_utils import randn_tensor

    from o2mkd_ray.core.teacher import eps_of

    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x = randn_tensor((num_images, *shape), generator=g, device=device) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    params = inspect.signature(scheduler.step).parameters
    kw = {"eta": eta} if "eta" in params else {}
    if "generator" in params:
        kw["generator"] = g
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        eps = eps_of(model(x_in, t))
        x = scheduler.step(eps, t, x, **kw).prev_sample
    lo, hi = value_range
    return ((x - lo) / (hi - lo)).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def student_images(pipe, num_images: int, steps: int, seed: int, eta: float = 0.0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=num_images, generator=g, num_inference_steps=steps, eta=eta, output_type="np").images


def save_grid(rows: list[np.ndarray], labels: list[str], path: str | Path, title: str | None = None) -> Path:
    """Saves rows of images (each ``(N, H, W, C)`` in [0, 1]) as one PNG, a label per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9, len(rows) * 1.05 + 0.3), squeeze=False)
    for i, (r, lab) in enumerate(zip(rows, labels)):
        for j in range(n):
            ax = axes[i][j]
            ax.axis("off")
            if j < r.shape[0]:
                img = r[j]
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                          vmin=0, vmax=1)
        axes[i][0].set_title(lab, fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with replace_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path


def sampling_prompts(cfg: Config, n: int | None = None) -> list[str]:
    """``sampling.prompts`` topped up with the data's first captions to ``n`` prompts; by default all of
    ``sampling.prompts``, or the first ``sampling.num_images`` captions when there are none."""
    prompts = list(cfg.sampling.prompts or [])
    want = n if n is not None else (len(prompts) or cfg.sampling.num_images)
    if len(prompts) < want:
        from o2mkd_ray.data.captions import read_captions

        prompts += read_captions(cfg.data)["caption"].head(want - len(prompts)).tolist()
    return prompts[:want]


def scheduler_copy(pipe):
    """An identical, fresh copy of ``pipe``'s scheduler, for the other pipeline of a comparison.

    A copy of the instance, not ``from_config(its config)``: ``StableDiffusionPipeline.__init__`` normalises its
    scheduler (``clip_sample``, ``steps_offset``) and lists such keys in ``_use_default_values``, which
    ``from_config`` would quietly restore to the class defaults.
    """
    return copy.deepcopy(pipe.scheduler)


def write_sd_samples(cfg: Config, teacher_pipe, pipe, prompts: list[str], path) -> dict:
    """``samples.png`` of a text-to-image run: teacher (top) and students (bottom), same prompts, noise, guidance."""

    sm = cfg.sampling
    pipe.set_progress_bar_config(disable=True)
    teacher_pipe.scheduler = scheduler_copy(pipe)
    kw = {"steps": sm.steps, "guidance_scale": sm.guidance_scale, "seed": sm.seed,
          "negative_prompt": sm.negative_prompt}
    t_img, s_img = sample_images(teacher_pipe, prompts, **kw), sample_images(pipe, prompts, **kw)
    mse = image_fidelity(t_img, s_img)["mse_mean"]
    save_grid([t_img, s_img], ["teacher", f"O2MKD students (N={students_of(pipe).num_students})"], path,
              title=f"{sm.scheduler} {sm.steps} steps, guidance {sm.guidance_scale}, same noise; pixel MSE {mse:.4f}")
    return {"scheduler": sm.scheduler, "steps": sm.steps, "num_images": len(prompts), "prompts": prompts,
            "guidance_scale": sm.guidance_scale, "pixel_mse_vs_teacher": mse}


def students_of(pipe):
    """The multi-student model of an O2MKD pipeline (``unet``; ``transformer`` in the DiT and SD3 pipelines)."""
    return getattr(pipe, getattr(pipe, "students_component", "unet"))


def sampling_class_labels(cfg: Config, num_classes: int, n: int | None = None) -> list[int]:
    """The class labels of a DiT run's sample grid: ``0, 1, ...`` (``sampling.num_images`` of them, or ``n``),
    wrapping at the teacher's number of classes."""
    return [i % num_classes for i in range(n if n is not None else cfg.sampling.num_images)]


def write_dit_samples(cfg: Config, teacher_pipe, pipe, path) -> dict:
    """``samples.png`` of a DiT run: teacher (top) and students (bottom), same class labels, noise and guidance."""
    sm = cfg.sampling
    pipe.set_progress_bar_config(disable=True)
    teacher_pipe.scheduler = scheduler_copy(pipe)
    labels = sampling_class_labels(cfg, int(teacher_pipe.transformer.config.num_embeds_ada_norm))
    imgs = [p(class_labels=labels, guidance_scale=sm.guidance_scale, num_inference_steps=sm.steps,
              generator=torch.Generator().manual_seed(sm.seed), output_type="np").images
            for p in (teacher_pipe, pipe)]
    mse = image_fidelity(*imgs)["mse_mean"]
    save_grid(imgs, ["teacher", f"O2MKD students (N={pipe.transformer.num_students})"], path,
              title=f"{sm.scheduler} {sm.steps} steps, guidance {sm.guidance_scale}, same noise; pixel MSE {mse:.4f}")
    return {"scheduler": sm.scheduler, "steps": sm.steps, "num_images": len(labels), "class_labels": labels,
            "guidance_scale": sm.guidance_scale, "pixel_mse_vs_teacher": mse}


def write_samples(cfg: Config, teacher_model: nn.Module, pipe, teacher_scheduler_config, shape, path) -> dict:
    """``samples.png``: teacher (top) and O2MKD students (bottom) from the same initial noise and scheduler."""
    sm = cfg.sampling
    n = sm.num_images
    t_img = teacher_images(teacher_model, make_scheduler(sm.scheduler, teacher_scheduler_config), shape,
                           cfg.data.value_range, n, sm.steps, sm.seed, sm.eta)
    s_img = student_images(pipe, n, sm.steps, sm.seed, sm.eta)
    mse = image_fidelity(t_img, s_img)["mse_mean"]
    save_grid([t_img, s_img], ["teacher", f"O2MKD students (N={pipe.students.num_students})"], path,
              title=f"{sm.scheduler} {sm.steps} steps, same noise; pixel MSE {mse:.4f}")
    return {"scheduler": sm.scheduler, "steps": sm.steps, "num_images": n, "pixel_mse_vs_teacher": mse}


@contextlib.contextmanager
def sampling_state(pipe, scheduler):
    """Temporarily a fresh ``scheduler`` and no progress bar on ``pipe``; restored afterwards."""
    old_sched = pipe.scheduler
    old_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(**{**old_bar, "disable": True})
    try:
        yield pipe
    finally:
        pipe.scheduler = old_sched
        pipe._progress_bar_config = old_bar


def _generators(seed: int, start: int, n: int) -> list[torch.Generator]:
    """One CPU generator per image (image i seeded ``seed + i``): the latents depend neither on the batch
    split nor on the device (diffusers draws on the CPU and moves them)."""
    return [torch.Generator().manual_seed(seed + start + i) for i in range(n)]


@torch.no_grad()
def sample_images(pipe, prompts: list[str], *, steps: int, guidance_scale: float, seed: int,
                  negative_prompt: str | list[str] | None = None, batch_size: int | None = None,
                  height: int | None = None, width: int | None = None) -> np.ndarray:
    """``(N, H, W, 3)`` in [0, 1]: image i of ``prompts[i]`` from ``torch.Generator().manual_seed(seed + i)``, so
    teacher and students start from the same latents whatever the batch split.

    Args:
        negative_prompt: one for all prompts, or one per prompt.
        batch_size: prompts per pipeline call (default: all in one call).
    """
    n = len(prompts)
    neg = [negative_prompt] * n if isinstance(negative_prompt, str) else negative_prompt
    step = batch_size or max(1, n)
    out = []
    for i in range(0, n, step):
        chunk = list(prompts[i:i + step])
        out.append(pipe(prompt=chunk, negative_prompt=None if neg is None else neg[i:i + len(chunk)],
                        num_inference_steps=steps, guidance_scale=guidance_scale,
                        generator=_generators(seed, i, len(chunk)), height=height, width=width,
                        output_type="np").images)
    return np.concatenate(out)
