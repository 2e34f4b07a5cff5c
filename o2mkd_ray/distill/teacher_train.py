"""``o2mkd-ray teacher CONFIG``: trains a small diffusers UNet2DModel + DDPMScheduler teacher from scratch.

This is how the embedded default teacher (``o2mkd_ray/assets/digits_teacher``) was made; see README.
Plain PyTorch, one process: the ordinary DDPM ε-prediction loss (Ho et al. 2020, eq. 14).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from o2mkd_ray.config.loading import build_section
from o2mkd_ray.config.schema import DataConfig
from o2mkd_ray.core.atomic import write_json
from o2mkd_ray.data.build import build_dataset
from o2mkd_ray.data.images import infinite, make_loader, random_flip
from o2mkd_ray.distill.ema import EMA
from o2mkd_ray.errors import ConfigError


@dataclass
class TeacherTrainConfig:
    unet: dict = field(default_factory=dict)  # UNet2DModel config
    scheduler: dict = field(default_factory=lambda: {"num_train_timesteps": 1000, "beta_schedule": "linear"})
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    ema_decay: float = 0.999
    warmup_steps: int = 100
    seed: int = 0
    num_threads: int = 0
    out: str = "runs/teacher"


def load_teacher_train_config(path: str | Path, overrides: list[str] | None = None) -> TeacherTrainConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"teacher config {str(p)!r} does not exist")
    data = yaml.safe_load(p.read_text()) or {}
    from o2mkd_ray.config.loading import parse_override

    for item in overrides or []:
        k, v = parse_override(item)
        d = data
        parts = k.split(".")
        for part in parts[:-1]:
            d = d.setdefault(part, {})
        d[parts[-1]] = v
    return build_section(TeacherTrainConfig, data)


def train_teacher(cfg: TeacherTrainConfig, out: str | None = None, progress: bool = True) -> dict:
    """Trains the teacher and saves a DDPMPipeline folder (``unet/`` + ``scheduler/``, safetensors).

    Returns:
        A summary dict (steps, final loss, wall seconds, params, out path).
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from tqdm.auto import tqdm

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    unet = UNet2DModel(**cfg.unet)
    scheduler = DDPMScheduler(**cfg.scheduler)
    ema = EMA(unet, cfg.ema_decay)  # the students' EMA too
    data = infinite(make_loader(build_dataset(cfg.data), cfg.batch_size, cfg.seed))
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * 0.5 * (1 + torch.cos(torch.tensor(s / cfg.steps * torch.pi)).item())
    )
    g = torch.Generator().manual_seed(cfg.seed)
    T = scheduler.config.num_train_timesteps
    t0, losses = time.time(), []
    bar = tqdm(range(cfg.steps), desc="teacher", disable=not progress)
    for step in bar:
        (x_0,) = next(data)  # (B, C, H, W)
        if cfg.data.random_flip:
            x_0 = random_flip(x_0, g)
        eps = torch.randn(x_0.shape, generator=g)
        t = torch.randint(0, T, (x_0.shape[0],), generator=g)
        x_t = scheduler.add_noise(x_0, eps, t)
        loss = F.mse_loss(unet(x_t, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    out_dir = Path(out or cfg.out)
    DDPMPipeline(unet=ema.module, scheduler=scheduler).save_pretrained(out_dir, safe_serialization=True)
    summary = {
        "steps": cfg.steps,
        "final_loss": sum(losses[-100:]) / len(losses[-100:]),
        "wall_s": round(time.time() - t0, 1),
        "params": sum(p.numel() for p in unet.parameters()),
        "out": str(out_dir),
        "config": {**dataclasses.asdict(cfg), "data": cfg.data.to_dict()},  # data is a pydantic section
    }
    write_json(out_dir / "training.json", summary)
    return summary
