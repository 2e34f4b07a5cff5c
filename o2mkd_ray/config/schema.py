"""The typed config tree: one pydantic model per section, with defaults, value constraints and the rules that tie
fields together; plus the scheduler short names.

Types are strict (``true`` is not an integer, ``"3"`` is not a number; an integer is accepted for a float) and
unknown keys are rejected; every error is a one-line ConfigError naming the key (see ``config.messages``).
Rules between sections (one student width per segment, segment-override indices, teacher kind vs data kind) are
those of a whole run: they apply when a config is loaded (``loading.from_dict`` passes :data:`WHOLE_RUN`), not when
code assembles a Config from parts (tests build configs for a number of students given separately).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
    model_validator,
)

from o2mkd_ray.config import checks
from o2mkd_ray.config.base import Section
from o2mkd_ray.errors import ConfigError

# validation context under which the rules between sections apply (see the module docstring)
WHOLE_RUN = "whole_run"

UpToOne = Annotated[float, Field(ge=0, lt=1)]  # a share or a decay, in [0, 1)


class TeacherConfig(Section):
    """The teacher model and how it is served (a Ray actor pool, or in each worker)."""

    section_key: ClassVar[str] = "teacher"
    pretrained: str | None = None  # diffusers model id or local folder (UNet2DModel, or a Stable Diffusion folder)
    # unet: an unconditional UNet2DModel; stable_diffusion: a text-to-image SD folder/id (UNet2DConditionModel +
    # vae/ text_encoder/ tokenizer/ scheduler/); stable_diffusion_xl: an SDXL folder/id (recognised so that it is
    # refused in one line: SDXL is not distilled yet); dit: a class-conditional DiT folder/id (DiTTransformer2DModel
    # + vae/ scheduler/, DiTPipeline); sd3: a Stable Diffusion 3 folder/id (SD3Transformer2DModel, flow matching,
    # StableDiffusion3Pipeline; T5 optional); auto: read it from a local folder (hub ids need it set)
    kind: Literal["auto", "unet", "stable_diffusion", "stable_diffusion_xl", "dit", "sd3"] = "auto"
    subfolder: str | None = None  # e.g. "unet" when the folder is a whole pipeline
    factory: str | None = None  # "module:function" -> (model, scheduler)
    mode: Literal["actor", "local"] = "actor"
    # a number of actors spread over the nodes (Ray's SPREAD), or "per_node": one on each node that has CPUs or
    # GPUs, where train workers can run; a worker calls the replica on its own node when there is one
    replicas: int | Literal["per_node"] = 1
    num_cpus: NonNegativeFloat = 0.5
    num_gpus: NonNegativeFloat = 0.0
    max_batch: PositiveInt = 512
    max_wait_ms: NonNegativeFloat = 2.0
    max_concurrency: PositiveInt = 2
    max_restarts: int = 3
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @field_validator("replicas")
    @classmethod
    def _some_replicas(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ConfigError(f"teacher.replicas: must be >= 1 or 'per_node', got {v}")
        return v

    @field_validator("max_restarts")
    @classmethod
    def _restarts_or_unlimited(cls, v: int) -> int:
        if v < -1:
            raise ConfigError(f"teacher.max_restarts: must be >= 0 (or -1 for no limit), got {v}")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> TeacherConfig:
        checks.check_teacher_source(self.pretrained, self.factory)
        return self


class SegmentsConfig(Section):
    """How the timestep range [0, T) is cut into one segment per student."""

    section_key: ClassVar[str] = "segments"
    n: PositiveInt = 3  # derived from boundaries or fractions when either is given
    boundaries: list[int] | None = None  # explicit [0, b1, ..., T]
    fractions: list[float] | None = None  # cut points in (0, 1), e.g. [0.3, 0.6]

    @model_validator(mode="after")
    def _derive_n(self) -> SegmentsConfig:
        # explicit boundaries or cut points decide the number of segments; n is only the default's count
        if self.boundaries is not None and self.fractions is not None:
            raise ConfigError("segments: set either segments.boundaries or segments.fractions, not both")
        if self.boundaries is not None:
            self.n = len(checks.check_boundaries(self.boundaries)) - 1
        if self.fractions is not None:
            checks.check_fractions(self.fractions)
            self.n = len(self.fractions) + 1
        return self


class StudentsConfig(Section):
    """Shape and initialisation of the students (one per segment)."""

    section_key: ClassVar[str] = "students"
    width: float | list[float] = 0.5  # one multiplier, or one per segment (DiT: the share of attention heads kept)
    depth: float | list[float] | None = None  # DiT: the share of transformer blocks kept (None: all), or one per segment
    layers_per_block: int | list[int] | None = None
    unet: dict | None = None  # explicit UNet2DModel config (teachers that are not UNet2DModel)
    init: Literal["teacher", "scratch"] = "teacher"
    drop_mid_block: bool = False  # BK-SDM-Small style: no mid block (conditional UNets)
    # KOALA style (SDXL-like teachers): transformer layers in each attention block, for every student; an int, or
    # one per down block (SDXL base has [1, 2, 10]; [1, 2, 5] halves the deep stage); None keeps the teacher's
    transformer_layers_per_block: int | list[int] | None = None

    @field_validator("width")
    @classmethod
    def _width_range(cls, v: float | list[float]) -> float | list[float]:
        checks.check_widths(v)
        return v

    @field_validator("depth")
    @classmethod
    def _depth_range(cls, v: float | list[float] | None) -> float | list[float] | None:
        checks.check_depths(v)
        return v

    @field_validator("layers_per_block")
    @classmethod
    def _layers_at_least_one(cls, v: int | list[int] | None) -> int | list[int] | None:
        checks.check_layers(v)
        return v

    @field_validator("transformer_layers_per_block")
    @classmethod
    def _transformer_layers_at_least_one(cls, v: int | list[int] | None) -> int | list[int] | None:
        checks.check_layers(v, "students.transformer_layers_per_block")
        return v


class KDConfig(Section):
    """Weights of the distillation losses and the feature-KD method."""

    section_key: ClassVar[str] = "kd"
    lambda_out: NonNegativeFloat = 1.0
    lambda_feat: NonNegativeFloat = 0.1
    lambda_task: NonNegativeFloat = 0.0
    feature_method: str = "fitnet"  # a name in o2mkd_ray.core.kd.KD_METHODS (fitnet, attention, or registered)
    feature_blocks: list[str] | None = None  # None: every down/mid/up block

    @model_validator(mode="after")
    def _something_to_train(self) -> KDConfig:
        if self.lambda_out + self.lambda_feat + self.lambda_task == 0:
            raise ConfigError("kd: all of kd.lambda_out, kd.lambda_feat, kd.lambda_task are 0; nothing to train")
        return self


class DataConfig(Section):
    """The training data (images, or prompts for text-to-image teachers)."""

    section_key: ClassVar[str] = "data"
    kind: Literal["digits", "image_folder", "torchvision", "hf", "prompts", "classes"] = "digits"
    name: str | None = None  # torchvision class (CIFAR10, MNIST, ...) or HF dataset id
    # image folder, torchvision/HF download root, a prompts file (.txt/.csv/.parquet/.json), or (kind=classes) a
    # folder with one subfolder of images per class (named by class id or by a name of the teacher's id2label)
    path: str | None = None
    split: str = "train"
    image_key: str = "image"  # HF datasets column (prompts: optional image column / file-path column)
    # prompts (Stable Diffusion teachers): captions, optional images; embeddings/latents are cached once
    caption_key: str = "caption"  # caption column of a CSV/parquet/HF dataset
    image_root: str | None = None  # folder that relative image paths (CSV column, COCO json file_name) live in
    max_prompts: PositiveInt | None = None  # first N captions (e.g. 30000 for COCO30K)
    uncond_prob: UpToOne = 0.1  # share of training samples conditioned on the empty prompt (for guidance)
    synth_steps: PositiveInt = 20  # prompts without images: x_0 latents are sampled once by the teacher, this many steps
    synth_guidance: NonNegativeFloat = 7.5
    synth_samples: PositiveInt = 64  # kind=classes without data.path: latents the teacher samples from random labels
    resolution: PositiveInt = 16
    channels: int = 1
    value_range: list[float] = Field(default_factory=lambda: [-1.0, 1.0])
    random_flip: bool = False
    download: bool = False

    @field_validator("channels")
    @classmethod
    def _image_channels(cls, v: int) -> int:
        if v not in (1, 3, 4):
            raise ConfigError(f"data.channels: must be 1, 3 or 4, got {v}")
        return v

    @field_validator("value_range")
    @classmethod
    def _low_below_high(cls, v: list[float]) -> list[float]:
        if len(v) != 2 or not v[0] < v[1]:
            raise ConfigError(f"data.value_range: expected [low, high] with low < high, got {v}")
        return v

    @model_validator(mode="after")
    def _has_a_source(self) -> DataConfig:
        checks.check_data_source(self.kind, self.path, self.name)
        return self


class TrainConfig(Section):
    """Optimisation of each student."""

    section_key: ClassVar[str] = "train"
    # one budget for every segment, or one per segment (the same total can go where the teacher is hardest to match)
    steps: PositiveInt | list[PositiveInt] = 600
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    grad_clip: NonNegativeFloat = 1.0
    ema_decay: UpToOne = 0.995
    warmup_steps: NonNegativeInt = 20
    seed: int = 0
    checkpoint_every: PositiveInt = 100
    log_every: NonNegativeInt = 10  # live loss terms, lr, grad norm, samples/s every N steps; 0: only at checkpoints
    val_batches: NonNegativeInt = 2
    select: Literal["final", "best"] = "final"
    num_threads: NonNegativeInt = 0  # torch threads per worker; 0 = leave torch's default

    def segment_steps(self, k: int) -> int:
        """Segment ``k``'s step budget."""
        return self.steps[k] if isinstance(self.steps, list) else self.steps

    @property
    def max_steps(self) -> int:
        """The largest segment budget (the run's last step)."""
        return max(self.steps) if isinstance(self.steps, list) else self.steps


class SamplingConfig(Section):
    """How sample images are drawn (scheduler, steps, guidance, prompts)."""

    section_key: ClassVar[str] = "sampling"
    scheduler: str = "ddim"  # ddim | ddpm | dpm | pndm | euler | a diffusers class name
    steps: PositiveInt = 50
    num_images: PositiveInt = 16
    eta: Annotated[float, Field(ge=0, le=1)] = 0.0
    seed: int = 0
    guidance_scale: NonNegativeFloat = 7.5  # text-to-image: classifier-free guidance
    prompts: list[str] | None = None  # text-to-image: prompts of samples.png (default: the first data captions)
    negative_prompt: str | None = None

    @field_validator("prompts")
    @classmethod
    def _some_prompts(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ConfigError("sampling.prompts: give at least one prompt, or remove it to use the data's captions")
        return v


class SegmentResources(Section):
    """Per-segment overrides of the Ray worker resources (None: the ray section's value)."""

    num_workers: PositiveInt | None = None
    cpus_per_worker: NonNegativeFloat | None = None
    gpus_per_worker: NonNegativeFloat | None = None


class RayConfig(Section):
    """The Ray cluster and the resources of the training workers."""

    section_key: ClassVar[str] = "ray"
    address: str | None = None  # existing cluster; else RAY_ADDRESS; else a local embedded Ray
    num_cpus: PositiveInt | None = None  # local Ray only; None = the machine's cores
    workers_per_segment: PositiveInt = 1
    # a segment's worker group: spread its workers over nodes, or pack them on as few nodes as fit (Ray Train's
    # ScalingConfig.placement_strategy SPREAD / PACK)
    placement: Literal["spread", "pack"] = "pack"
    cpus_per_worker: NonNegativeFloat = 0.5
    gpus_per_worker: NonNegativeFloat = 0.0
    segment_overrides: dict[str, SegmentResources] = Field(default_factory=dict)  # {"0": {...}}
    storage_path: str | None = None  # default OUT/ray; a shared path or cloud URI on a cluster
    max_failures: NonNegativeInt = 2
    num_to_keep: PositiveInt = 2
    health_check_interval_s: PositiveFloat = 0.3
    dashboard_host: str = "127.0.0.1"

    @field_validator("address")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None:
            checks.ray_host_port(v, "ray.address")
        return v

    @model_validator(mode="after")
    def _some_compute(self) -> RayConfig:
        if self.cpus_per_worker == 0 and self.gpus_per_worker == 0:
            raise ConfigError("ray.cpus_per_worker: a worker needs some CPU or GPU; set cpus_per_worker > 0")
        return self


class MlflowConfig(Section):
    """MLflow tracking."""

    section_key: ClassVar[str] = "mlflow"
    enabled: bool = True
    tracking_uri: str | None = None
    experiment: str = "o2mkd"
    log_pipeline: bool = True
    timeout_s: PositiveFloat = 5.0  # per HTTP request to the tracking server; a call gives up after 2x this (then warns)


class EvalConfig(Section):
    """The evaluation pass after training (FID, CLIP score, latency)."""

    section_key: ClassVar[str] = "eval"
    enabled: bool = True
    num_images: PositiveInt = 16
    steps: PositiveInt = 20
    fid_weights: str | None = None  # local Inception weights for FID; else a labelled fallback feature space
    clip_model: str | None = None  # text-to-image: a local CLIP folder (CLIPModel + processor) for CLIP score


class Config(Section):
    """The whole run: one field per section, plus the open ``debug`` mapping of test-only switches."""

    name: str = "o2mkd"
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    segments: SegmentsConfig = Field(default_factory=SegmentsConfig)
    students: StudentsConfig = Field(default_factory=StudentsConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    debug: dict = Field(default_factory=dict)  # test-only switches (fault injection); documented in README

    @field_validator("debug")
    @classmethod
    def _debug_switches(cls, v: dict) -> dict:
        checks.check_debug(v)
        return v

    @model_validator(mode="after")
    def _sections_agree(self, info: ValidationInfo) -> Config:
        if info.context and info.context.get(WHOLE_RUN):
            n = self.segments.n
            checks.check_per_segment(self.students.width, self.students.layers_per_block, n)
            checks.check_segment_steps(self.train.steps, n)
            if isinstance(self.students.depth, list) and len(self.students.depth) != n:
                raise ConfigError(f"students.depth: got {len(self.students.depth)} values for {n} segments")
            checks.check_kinds(self.teacher.kind, self.data.kind)
            checks.check_segment_keys(list(self.ray.segment_overrides), n)
        return self


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",  # flow-matching teachers (SD3)
    "flow_heun": "FlowMatchHeunDiscreteScheduler",
}
