"""One typed config tree: YAML load, ``--set a.b=c`` overrides, validation, ``to_dict``.

Every user-supplied value is checked here, before any Ray work starts; errors are :class:`ConfigError` with one
line that names the key and says what to fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user-facing, one-line configuration error (key or path + what to fix)."""


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
    feature_method: str = "fitnet"  # a name in o2mkd_ray.kd.KD_METHODS (fitnet, attention, or registered)
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


# --------------------------------------------------------------------------------------------------------------
# building from plain data, with type checks


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (a,) = typing.get_args(tp)
        return f"list of {_type_name(a)}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        last: ConfigError | None = None
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                last = e
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}") from last
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        (a,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, a, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean '{(prefix + '.') if prefix else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def known_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted leaf keys of the config tree (for did-you-mean and Tune space checks)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            out += known_keys(hints[f.name], key)
        else:
            out.append(key)
    return out


# --------------------------------------------------------------------------------------------------------------
# overrides


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=c"`` -> ``("a.b", yaml-parsed c)``."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set students.width=0.5")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Sets ``data[a][b] = value`` for ``key = "a.b"``; checks the key against the config tree."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {key}: empty key part")
    valid = known_keys()
    # mapping-valued leaves (students.unet, ray.segment_overrides, debug) may take sub-keys
    mapping_leaves = ("students.unet", "ray.segment_overrides", "debug")
    if key not in valid and not any(key.startswith(m + ".") for m in mapping_leaves):
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{key}'{hint}")
    d = data
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def from_dict(data: dict | None, overrides: list[str] | None = None) -> Config:
    data = json.loads(json.dumps(data or {}))  # deep copy, JSON-safe
    for item in overrides or []:
        k, v = parse_override(item)
        set_dotted(data, k, v)
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Loads a YAML (or JSON) config file, applies ``--set`` overrides and validates.

    Args:
        path: a YAML file; None gives the embedded default (``pipelines/digits.yaml`` equivalent).
        overrides: ``["a.b=c", ...]``.
    Returns:
        A validated :class:`Config`.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file such as pipelines/digits.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            raise ConfigError(f"config file {str(p)!r}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r}: top level must be a mapping of sections (teacher:, data:, ...)")
    return from_dict(data, overrides)


# --------------------------------------------------------------------------------------------------------------
# validation of values (types were checked while building)


def _positive(key: str, v: float | int, strict: bool = True) -> None:
    if (v <= 0) if strict else (v < 0):
        raise ConfigError(f"{key}: must be {'> 0' if strict else '>= 0'}, got {v}")


def validate(cfg: Config) -> None:
    """Checks values that types cannot express. Raises ConfigError with one line naming the key."""
    t = cfg.teacher
    if t.pretrained and t.factory:
        raise ConfigError("teacher: set either teacher.pretrained or teacher.factory, not both")
    if t.factory is not None and (":" not in t.factory or not all(t.factory.split(":", 1))):
        raise ConfigError(f"teacher.factory: expected 'module:function', got {t.factory!r}")
    _positive("teacher.replicas", t.replicas)
    _positive("teacher.num_cpus", t.num_cpus, strict=False)
    _positive("teacher.num_gpus", t.num_gpus, strict=False)
    _positive("teacher.max_batch", t.max_batch)
    _positive("teacher.max_concurrency", t.max_concurrency)
    _positive("teacher.max_wait_ms", t.max_wait_ms, strict=False)

    if t.max_restarts < -1:
        raise ConfigError(f"teacher.max_restarts: must be >= 0 (or -1 for no limit), got {t.max_restarts}")

    s = cfg.segments
    _positive("segments.n", s.n)
    if s.boundaries is not None and s.fractions is not None:
        raise ConfigError("segments: set either segments.boundaries or segments.fractions, not both")
    if s.boundaries is not None:
        from .segments import _check_boundaries  # structure only; the last value is checked against T in preflight

        _check_boundaries(s.boundaries)
    if s.boundaries is not None and len(s.boundaries) - 1 != s.n:
        s.n = len(s.boundaries) - 1  # explicit boundaries decide n
    if s.fractions is not None:
        s.n = len(s.fractions) + 1
        prev = 0.0
        for i, f in enumerate(s.fractions):
            if not prev < f < 1.0:
                raise ConfigError(f"segments.fractions[{i}]: cut points must increase strictly inside (0, 1), got {f}")
            prev = f

    st = cfg.students
    widths = st.width if isinstance(st.width, list) else [st.width]
    if isinstance(st.width, list) and len(st.width) != s.n:
        raise ConfigError(f"students.width: got {len(st.width)} widths for {s.n} segments; give one number or {s.n}")
    for i, w in enumerate(widths):
        if not 0 < w <= 4:
            raise ConfigError(f"students.width: multiplier must be in (0, 4], got {w}")
    if isinstance(st.layers_per_block, list) and len(st.layers_per_block) != s.n:
        raise ConfigError(f"students.layers_per_block: got {len(st.layers_per_block)} values for {s.n} segments")
    for v in st.layers_per_block if isinstance(st.layers_per_block, list) else [st.layers_per_block]:
        if v is not None and v < 1:
            raise ConfigError(f"students.layers_per_block: must be >= 1, got {v}")

    k = cfg.kd
    for name in ("lambda_out", "lambda_feat", "lambda_task"):
        _positive(f"kd.{name}", getattr(k, name), strict=False)
    if k.lambda_out + k.lambda_feat + k.lambda_task == 0:
        raise ConfigError("kd: all of kd.lambda_out, kd.lambda_feat, kd.lambda_task are 0; nothing to train")

    d = cfg.data
    if d.kind == "image_folder" and not d.path:
        raise ConfigError("data.path: required for data.kind=image_folder (a folder of PNG/JPEG images)")
    if d.kind in ("torchvision", "hf") and not d.name:
        raise ConfigError(f"data.name: required for data.kind={d.kind} (e.g. CIFAR10)")
    _positive("data.resolution", d.resolution)
    if d.channels not in (1, 3, 4):
        raise ConfigError(f"data.channels: must be 1, 3 or 4, got {d.channels}")
    if len(d.value_range) != 2 or not d.value_range[0] < d.value_range[1]:
        raise ConfigError(f"data.value_range: expected [low, high] with low < high, got {d.value_range}")
    if not 0 <= d.uncond_prob < 1:
        raise ConfigError(f"data.uncond_prob: must be in [0, 1), got {d.uncond_prob}")
    _positive("data.synth_steps", d.synth_steps)
    _positive("data.synth_guidance", d.synth_guidance, strict=False)
    if d.max_prompts is not None:
        _positive("data.max_prompts", d.max_prompts)
    check_kinds(t.kind, d.kind)

    tr = cfg.train
    for name in ("steps", "batch_size", "checkpoint_every"):
        _positive(f"train.{name}", getattr(tr, name))
    _positive("train.lr", tr.lr)
    _positive("train.weight_decay", tr.weight_decay, strict=False)
    _positive("train.grad_clip", tr.grad_clip, strict=False)
    _positive("train.val_batches", tr.val_batches, strict=False)
    _positive("train.warmup_steps", tr.warmup_steps, strict=False)
    _positive("train.num_threads", tr.num_threads, strict=False)
    if not 0 <= tr.ema_decay < 1:
        raise ConfigError(f"train.ema_decay: must be in [0, 1), got {tr.ema_decay}")

    sm = cfg.sampling
    _positive("sampling.steps", sm.steps)
    _positive("sampling.num_images", sm.num_images)
    _positive("sampling.guidance_scale", sm.guidance_scale, strict=False)
    if sm.prompts is not None and not sm.prompts:
        raise ConfigError("sampling.prompts: give at least one prompt, or remove it to use the data's captions")
    if not 0 <= sm.eta <= 1:
        raise ConfigError(f"sampling.eta: must be in [0, 1], got {sm.eta}")

    r = cfg.ray
    _positive("ray.workers_per_segment", r.workers_per_segment)
    _positive("ray.cpus_per_worker", r.cpus_per_worker, strict=False)
    _positive("ray.gpus_per_worker", r.gpus_per_worker, strict=False)
    if r.cpus_per_worker == 0 and r.gpus_per_worker == 0:
        raise ConfigError("ray.cpus_per_worker: a worker needs some CPU or GPU; set cpus_per_worker > 0")
    _positive("ray.max_failures", r.max_failures, strict=False)
    _positive("ray.num_to_keep", r.num_to_keep)
    _positive("ray.health_check_interval_s", r.health_check_interval_s)
    if r.num_cpus is not None:
        _positive("ray.num_cpus", r.num_cpus)
    if r.address is not None:
        _ray_host_port(r.address, "ray.address")
    for key, ov in r.segment_overrides.items():
        if not key.isdigit() or int(key) >= s.n:
            raise ConfigError(f"ray.segment_overrides.{key}: keys are segment indices 0..{s.n - 1}")
        for name in ("num_workers", "cpus_per_worker", "gpus_per_worker"):
            v = getattr(ov, name)
            if v is not None:
                _positive(f"ray.segment_overrides.{key}.{name}", v, strict=name == "num_workers")

    _positive("mlflow.timeout_s", cfg.mlflow.timeout_s)
    _positive("eval.num_images", cfg.eval.num_images)
    _positive("eval.steps", cfg.eval.steps)
    _check_debug(cfg.debug)

    # last: these two import torch (the registries live next to the code that uses them)
    check_scheduler_name(sm.scheduler, "sampling.scheduler")
    from .kd import KD_METHODS

    if k.feature_method not in KD_METHODS:
        close = difflib.get_close_matches(k.feature_method, list(KD_METHODS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"kd.feature_method: unknown {k.feature_method!r}; {hint}registered: "
                          f"{', '.join(sorted(KD_METHODS))} (add one with o2mkd_ray.kd.register_kd)")


def check_kinds(teacher_kind: str, data_kind: str) -> None:
    """A Stable Diffusion teacher distils on prompts (data.kind=prompts), an unconditional one on images."""
    if teacher_kind == "stable_diffusion" and data_kind != "prompts":
        raise ConfigError(f"data.kind: a Stable Diffusion teacher distils on captions; set data.kind=prompts (got "
                          f"{data_kind!r}) with data.path or data.name")
    if teacher_kind == "unet" and data_kind == "prompts":
        raise ConfigError("data.kind: prompts need a text-conditioned teacher; set teacher.kind=stable_diffusion "
                          "and teacher.pretrained to a Stable Diffusion folder or id")


def check_scheduler_name(name: str, key: str) -> None:
    """Raises ConfigError unless ``name`` is a short scheduler name or a diffusers scheduler class."""
    from .assemble import SCHEDULERS

    if name.lower() in SCHEDULERS:
        return
    import diffusers

    try:
        cls = getattr(diffusers, name, None)
    except Exception:  # noqa: BLE001 - diffusers' lazy module raises on broken optional imports
        cls = None
    if not (isinstance(cls, type) and name.endswith("Scheduler") and hasattr(cls, "from_config")):
        close = difflib.get_close_matches(name.lower(), list(SCHEDULERS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{key}: unknown scheduler {name!r}; {hint}use one of {', '.join(sorted(SCHEDULERS))} "
                          "or a diffusers scheduler class name such as DDIMScheduler")


# test-only fault-injection switches (docs/validation.md, "Rehearsing failures"). `debug` stays an open mapping
# (tests put other test-only values there); a key close to a switch name is taken for a typo and rejected.
DEBUG_SWITCHES = ("kill_worker", "kill_teacher_after_requests", "kill_driver_after_checkpoints", "marker")


def _check_debug(debug: dict) -> None:
    for key, v in debug.items():
        if key not in DEBUG_SWITCHES:
            close = difflib.get_close_matches(key, DEBUG_SWITCHES, n=1, cutoff=0.8)
            if close:
                raise ConfigError(f"unknown config key 'debug.{key}'; did you mean 'debug.{close[0]}'?")
            continue
        if key in ("kill_teacher_after_requests", "kill_driver_after_checkpoints") and v is not None:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"debug.{key}: expected an integer >= 1, got {v!r}")
        if key == "marker" and v is not None and not isinstance(v, str):
            raise ConfigError(f"debug.marker: expected a file path, got {v!r}")
        if key == "kill_worker" and v is not None:
            if not isinstance(v, dict) or not isinstance(v.get("step"), int) or isinstance(v.get("step"), bool):
                raise ConfigError("debug.kill_worker: expected {segment: K, rank: R, step: S, marker: PATH} "
                                  f"with an integer step, got {v!r}")
            extra = sorted(set(v) - {"segment", "rank", "step", "marker"})
            if extra:
                raise ConfigError(f"debug.kill_worker: unknown field '{extra[0]}'; use segment, rank, step, marker")


# --------------------------------------------------------------------------------------------------------------
# checks of the outside world (paths, network) for preflight: nothing here writes anything


def _ray_host_port(address: str, key: str) -> tuple[str, int] | None:
    """``(host, port)`` of a GCS / Ray Client address; None for ``auto`` / ``local``. ConfigError on bad form."""
    a = address.strip()
    if a in ("auto", "local"):
        return None
    for scheme in ("ray://", "http://", "https://"):
        if a.startswith(scheme):
            a = a[len(scheme):]
            break
    host, sep, port = a.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected host:port, ray://host:port or auto, got {address!r}; "
                          "e.g. ray.address=127.0.0.1:6379")
    return host.strip("[]"), int(port)


def check_ray_address(address: str | None, key: str = "ray.address", timeout_s: float = 3.0) -> None:
    """Fails fast (one TCP connect, ``timeout_s``) when an existing Ray cluster's address is unreachable.

    ``ray.init(address=...)`` on a dead address keeps retrying for minutes; this check turns that into one line.
    Nothing to check for a local embedded Ray (``address`` None or ``local``).
    """
    if not address:
        return
    if address.strip() == "auto":
        try:
            from ray._private.services import canonicalize_bootstrap_address_or_die

            address = canonicalize_bootstrap_address_or_die("auto")
        except ConnectionError:
            raise ConfigError(f"{key}: 'auto' found no running Ray cluster on this machine; start one with "
                              "`ray start --head` or unset ray.address/RAY_ADDRESS for a local Ray") from None
        except (ImportError, AttributeError):  # Ray internals moved: leave the check to ray.init
            return
    hp = _ray_host_port(address, key)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot reach a Ray cluster at {address!r} ({e.strerror or type(e).__name__}); "
                          "start it with `ray start --head` or unset ray.address/RAY_ADDRESS for a local Ray") from None


def check_out_path(out: str | Path, flag: str = "--out") -> Path:
    """Checks that ``out`` can be created as (or already is) a writable folder; creates nothing.

    Returns:
        The absolute path.
    """
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {str(out)!r} is a file; give a folder path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {str(out)!r}: {str(parent)!r} is a file, so no folder can be made "
                                  "under it; choose another path")
            break
    existing = out if out.exists() else next(p for p in out.parents if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {str(out)!r} is not writable ({str(existing)!r} is read-only); "
                          "choose a folder you can write to")
    return out
