"""From trained students to the diffusers result: pipeline folder, sample grid, costs. Ray-free."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import ConfigError, Config

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def make_scheduler(name: str, base_config):
    """A diffusers sampling scheduler by short name or class name, on the teacher's noise schedule."""
    import diffusers

    cls_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ConfigError(f"sampling.scheduler: unknown scheduler {name!r}; use one of {sorted(SCHEDULERS)} or a diffusers class name")
    return cls.from_config(base_config)


def load_student(checkpoint_dir: str | Path, use_ema: bool = True) -> nn.Module:
    """The (EMA) student saved in a segment checkpoint folder (a UNet2DModel or UNet2DConditionModel)."""
    import json

    import diffusers

    d = Path(checkpoint_dir) / ("ema" if use_ema else "student")
    cls = json.loads((d / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if cls not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ConfigError(f"checkpoint {str(d)!r} holds a {cls}; expected a UNet2DModel or UNet2DConditionModel")
    return getattr(diffusers, cls).from_pretrained(d)


def build_pipeline(students: list[nn.Module], boundaries, scheduler, value_range):
    from .multi_unet import MultiStudentUNet
    from .pipeline import O2MKDPipeline

    multi = MultiStudentUNet(students, boundaries=list(boundaries), value_range=tuple(value_range))
    return O2MKDPipeline(students=multi, scheduler=scheduler)




@torch.no_grad()
def teacher_images(model: nn.Module, scheduler, shape, value_range, num_images: int, steps: int, seed: int,
                   eta: float = 0.0) -> np.ndarray:
    """Samples the teacher with the same loop, noise and scheduler as O2MKDPipeline (``(N, H, W, C)`` in [0, 1])."""
    import inspect

    from diffusers.utils.torch_utils import randn_tensor

    from .teacher import eps_of

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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def costs(model: nn.Module, shape, seq_len: int = 77) -> dict:
    """Parameters and MACs of one forward at batch 1; a text-conditioned UNet sees ``seq_len`` text tokens."""
    from .students import count_macs, count_params

    return {"params": int(count_params(model)), "macs": int(count_macs(model, (1, *shape), seq_len=seq_len))}


# --------------------------------------------------------------------------------------------------------------
# text-to-image (Stable Diffusion teachers)


def teacher_sd_pipeline(cfg: Config, unet: nn.Module | None = None):
    """The teacher as a diffusers ``StableDiffusionPipeline`` (its already loaded UNet reused when given)."""
    from diffusers import StableDiffusionPipeline

    kw = {"unet": unet} if unet is not None else {}
    pipe = StableDiffusionPipeline.from_pretrained(cfg.teacher.pretrained, safety_checker=None,
                                                   requires_safety_checker=False, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd_pipeline(students: list[nn.Module], boundaries, teacher_pipe, scheduler_name: str):
    """``O2MKDStableDiffusionPipeline``: the students routed by timestep, the teacher's VAE/text encoder/tokenizer,
    a sampling scheduler on the teacher's own scheduler config."""
    from .multi_unet import MultiStudentUNet
    from .sd_pipeline import O2MKDStableDiffusionPipeline

    multi = MultiStudentUNet(students, boundaries=list(boundaries))
    sampler = make_scheduler(scheduler_name, teacher_pipe.scheduler.config)
    return O2MKDStableDiffusionPipeline.from_teacher(teacher_pipe, multi, scheduler=sampler)


def sampling_prompts(cfg: Config, n: int | None = None) -> list[str]:
    """``sampling.prompts`` topped up with the data's first captions to ``n`` prompts; by default all of
    ``sampling.prompts``, or the first ``sampling.num_images`` captions when there are none."""
    prompts = list(cfg.sampling.prompts or [])
    want = n if n is not None else (len(prompts) or cfg.sampling.num_images)
    if len(prompts) < want:
        from .data import read_captions

        prompts += read_captions(cfg.data)["caption"].head(want - len(prompts)).tolist()
    return prompts[:want]


def write_sd_samples(cfg: Config, teacher_pipe, pipe, prompts: list[str], path) -> dict:
    """``samples.png`` of a text-to-image run: teacher (top) and students (bottom), same prompts, noise, guidance."""
    from .sd_eval import sample_images

    sm = cfg.sampling
    pipe.set_progress_bar_config(disable=True)
    # an identical copy of the students' scheduler: StableDiffusionPipeline.__init__ normalised it (clip_sample,
    # steps_offset), and from_config(its config) would restore the defaults it lists in _use_default_values
    teacher_pipe.scheduler = copy.deepcopy(pipe.scheduler)
    kw = {"steps": sm.steps, "guidance_scale": sm.guidance_scale, "seed": sm.seed,
          "negative_prompt": sm.negative_prompt}
    t_img, s_img = sample_images(teacher_pipe, prompts, **kw), sample_images(pipe, prompts, **kw)
    mse = float(np.mean((t_img - s_img) ** 2))
    save_grid([t_img, s_img], ["teacher", f"O2MKD students (N={pipe.unet.num_students})"], path,
              title=f"{sm.scheduler} {sm.steps} steps, guidance {sm.guidance_scale}, same noise; pixel MSE {mse:.4f}")
    return {"scheduler": sm.scheduler, "steps": sm.steps, "num_images": len(prompts), "prompts": prompts,
            "guidance_scale": sm.guidance_scale, "pixel_mse_vs_teacher": mse}


def write_samples(cfg: Config, teacher_model: nn.Module, pipe, teacher_scheduler_config, shape, path) -> dict:
    """``samples.png``: teacher (top) and O2MKD students (bottom) from the same initial noise and scheduler."""
    sm = cfg.sampling
    n = sm.num_images
    t_img = teacher_images(teacher_model, make_scheduler(sm.scheduler, teacher_scheduler_config), shape,
                           cfg.data.value_range, n, sm.steps, sm.seed, sm.eta)
    s_img = student_images(pipe, n, sm.steps, sm.seed, sm.eta)
    mse = float(np.mean((t_img - s_img) ** 2))
    save_grid([t_img, s_img], ["teacher", f"O2MKD students (N={pipe.students.num_students})"], path,
              title=f"{sm.scheduler} {sm.steps} steps, same noise; pixel MSE {mse:.4f}")
    return {"scheduler": sm.scheduler, "steps": sm.steps, "num_images": n, "pixel_mse_vs_teacher": mse}
