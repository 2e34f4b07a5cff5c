"""The typed config tree: one dataclass per section, with defaults and the scheduler short names.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TeacherConfig:
    pretrained: str | None = None  # diffusers model id or local folder (UNet2DModel, or a Stable Diffusion folder)
    # unet: an unconditional UNet2DModel; stable_diffusion: a text-to-image SD folder/id (UNet2DConditionModel +
    # vae/ text_encoder/ tokenizer/ scheduler/); auto: read it from a local folder (hub ids need it set)
    kind: Literal["auto", "unet", "stable_diffusion"] = "auto"
    subfolder: str | None = None  # e.g. "unet" when the folder is a whole pipeline
    factory: str | None = None  # "module:function" -> (model, scheduler)
    mode: Literal["actor", "local"] = "actor"
    replicas: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    max_batch: int = 512
    max_wait_ms: float = 2.0
    max_concurrency: int = 2
    max_restarts: int = 3
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class SegmentsConfig:
    n: int = 3
    boundaries: list[int] | None = None  # explicit [0, b1, ..., T]
    fractions: list[float] | None = None  # cut points in (0, 1), e.g. [0.3, 0.6]


@dataclass
class StudentsConfig:
    width: float | list[float] = 0.5  # one multiplier, or one per segment
    layers_per_block: int | list[int] | None = None
    unet: dict | None = None  # explicit UNet2DModel config (teachers that are not UNet2DModel)
    init: Literal["teacher", "scratch"] = "teacher"
    drop_mid_block: bool = False  # BK-SDM-Small style: no mid block (conditional UNets)


@dataclass
class KDConfig:
    lambda_out: float = 1.0
    lambda_feat: float = 0.1
    lambda_task: float = 0.0
    feature_method: str = "fitnet"  # a name in o2mkd_ray.core.kd.KD_METHODS (fitnet, attention, or registered)
    feature_blocks: list[str] | None = None  # None: every down/mid/up block


@dataclass
class DataConfig:
    kind: Literal["digits", "image_folder", "torchvision", "hf", "prompts"] = "digits"
    name: str | None = None  # torchvision class (CIFAR10, MNIST, ...) or HF dataset id
    path: str | None = None  # image folder, torchvision/HF download root, or a prompts file (.txt/.csv/.parquet/.json)
    split: str = "train"
    image_key: str = "image"  # HF datasets column (prompts: optional image column / file-path column)
    # prompts (Stable Diffusion teachers): captions, optional images; embeddings/latents are cached once
    caption_key: str = "caption"  # caption column of a CSV/parquet/HF dataset
    image_root: str | None = None  # folder that relative image paths (CSV column, COCO json file_name) live in
    max_prompts: int | None = None  # first N captions (e.g. 30000 for COCO30K)
    uncond_prob: float = 0.1  # share of training samples conditioned on the empty prompt (for guidance)
    synth_steps: int = 20  # prompts without images: x_0 latents are sampled once by the teacher, this many steps
    synth_guidance: float = 7.5
    resolution: int = 16
    channels: int = 1
    value_range: list[float] = field(default_factory=lambda: [-1.0, 1.0])
    random_flip: bool = False
    download: bool = False


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    warmup_steps: int = 20
    seed: int = 0
    checkpoint_every: int = 100
    val_batches: int = 2
    select: Literal["final", "best"] = "final"
    num_threads: int = 0  # torch threads per worker; 0 = leave torch's default


@dataclass
class SamplingConfig:
    scheduler: str = "ddim"  # ddim | ddpm | dpm | pndm | euler | a diffusers class name
    steps: int = 50
    num_images: int = 16
    eta: float = 0.0
    seed: int = 0
    guidance_scale: float = 7.5  # text-to-image: classifier-free guidance
    prompts: list[str] | None = None  # text-to-image: prompts of samples.png (default: the first data captions)
    negative_prompt: str | None = None


@dataclass
class SegmentResources:
    num_workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None


@dataclass
class RayConfig:
    address: str | None = None  # existing cluster; else RAY_ADDRESS; else a local embedded Ray
    num_cpus: int | None = None  # local Ray only; None = the machine's cores
    workers_per_segment: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    segment_overrides: dict[str, SegmentResources] = field(default_factory=dict)  # {"0": {...}}
    storage_path: str | None = None  # default OUT/ray; a shared path or cloud URI on a cluster
    max_failures: int = 2
    num_to_keep: int = 2
    health_check_interval_s: float = 0.3
    dashboard_host: str = "127.0.0.1"


@dataclass
class MlflowConfig:
    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "o2mkd"
    log_pipeline: bool = True
    timeout_s: float = 5.0  # per HTTP request to the tracking server; a call gives up after 2x this (then warns)


@dataclass
class EvalConfig:
    enabled: bool = True
    num_images: int = 16
    steps: int = 20
    fid_weights: str | None = None  # local Inception weights for FID; else a labelled fallback feature space
    clip_model: str | None = None  # text-to-image: a local CLIP folder (CLIPModel + processor) for CLIP score


@dataclass
class Config:
    name: str = "o2mkd"
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    segments: SegmentsConfig = field(default_factory=SegmentsConfig)
    students: StudentsConfig = field(default_factory=StudentsConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: dict = field(default_factory=dict)  # test-only switches (fault injection); documented in README

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


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
