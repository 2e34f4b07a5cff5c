"""Shared fixtures: tiny diffusers teachers saved to disk, a module-scoped local Ray with 2 CPUs."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.3")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="o2r-hf-"))  # never the user's ~/.cache
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# 2 cores shared by several processes (Ray workers, servers): more torch threads than cores thrash badly
torch.set_num_threads(1)


def tiny_unet(in_channels: int = 1, sample_size: int = 8, seed: int = 0, **kw):
    """The tiny test UNet (diffusers' test shape), in eval mode: from_pretrained returns eval-mode models and
    attention differs in the last bits between modes."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
        block_out_channels=(4, 8), norm_num_groups=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, **kw,
    ).eval()


def save_tiny_teacher(path: Path, in_channels: int = 1, sample_size: int = 8) -> Path:
    from diffusers import DDPMPipeline, DDPMScheduler

    DDPMPipeline(unet=tiny_unet(in_channels, sample_size), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "tiny_teacher")


@pytest.fixture(scope="session")
def tiny_overrides(tiny_teacher_dir) -> list[str]:
    """--set overrides turning pipelines/tiny.yaml into a seconds-long run on the tiny teacher."""
    return [f"teacher.pretrained={tiny_teacher_dir}", "mlflow.enabled=false", "eval.enabled=false"]


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster with 2 CPUs, temp files contained, shut down after the module."""
    import ray

    tmp = tempfile.mkdtemp(prefix="o2r-")
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", _temp_dir=tmp, configure_logging=False,
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.3",
                                       "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}})
    yield ray
    ray.shutdown()


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: Path | None = None):
    """Runs the real console entry point in a subprocess; returns CompletedProcess."""
    import subprocess

    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "o2mkd_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=str(cwd or ROOT))


PROMPTS = ["a red square", "a blue circle", "a green triangle", "a yellow star", "a black cat", "a white dog",
           "a small house", "a tall tree", "an old car", "a quiet lake", "a busy street", "a snowy mountain"]


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), built offline."""
    from o2mkd_ray.core.fixtures import make_tiny_sd

    d = tmp_path_factory.mktemp("sd") / "tiny_sd"
    make_tiny_sd(d)
    return d


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion XL folder (unet/ vae/ text_encoder(_2)/ tokenizer(_2)/ scheduler/), offline."""
    from o2mkd_ray.core.fixtures import make_tiny_sdxl

    d = tmp_path_factory.mktemp("sdxl") / "tiny_sdxl"
    make_tiny_sdxl(d)
    return d


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory) -> Path:
    """A tiny random class-conditional DiT folder (transformer/ vae/ scheduler/, id2label), built offline."""
    from o2mkd_ray.core.fixtures import make_tiny_dit

    d = tmp_path_factory.mktemp("dit") / "tiny_dit"
    make_tiny_dit(d)
    return d


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion 3 folder without T5 (transformer/ vae/ text_encoder(_2)/ tokenizer(_2)/
    scheduler/), built offline."""
    from o2mkd_ray.core.fixtures import make_tiny_sd3

    d = tmp_path_factory.mktemp("sd3") / "tiny_sd3"
    make_tiny_sd3(d)
    return d


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def sd_overrides(sd_dir: Path, prompts: Path) -> list[str]:
    """--set overrides of pipelines/tiny.yaml for a seconds-long text-to-image run on the tiny SD teacher."""
    return [f"teacher.pretrained={sd_dir}", "data.kind=prompts", f"data.path={prompts}", "data.synth_steps=3",
            "segments.n=2", "students.width=0.5", "students.layers_per_block=1", "students.drop_mid_block=true",
            "train.batch_size=4", "sampling.steps=3", "sampling.num_images=3", "mlflow.enabled=false",
            "eval.enabled=false"]
