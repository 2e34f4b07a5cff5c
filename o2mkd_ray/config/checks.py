"""Value checks the types cannot express, and checks of the outside world (paths, Ray address).

Nothing here writes anything or imports torch.
"""

from __future__ import annotations

import difflib
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

from o2mkd_ray.config.schema import Config
from o2mkd_ray.errors import ConfigError


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

        check_boundaries(s.boundaries)
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
        ray_host_port(r.address, "ray.address")
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


def check_kinds(teacher_kind: str, data_kind: str) -> None:
    """A Stable Diffusion teacher distils on prompts (data.kind=prompts), an unconditional one on images."""
    if teacher_kind == "stable_diffusion" and data_kind != "prompts":
        raise ConfigError(f"data.kind: a Stable Diffusion teacher distils on captions; set data.kind=prompts (got "
                          f"{data_kind!r}) with data.path or data.name")
    if teacher_kind == "unet" and data_kind == "prompts":
        raise ConfigError("data.kind: prompts need a text-conditioned teacher; set teacher.kind=stable_diffusion "
                          "and teacher.pretrained to a Stable Diffusion folder or id")


# test-only fault-injection switches (the README's "Bad input and failures" section). `debug` stays an open mapping
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


def ray_host_port(address: str, key: str) -> tuple[str, int] | None:
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


_HINT = "give [0, b1, ..., T] with 0 < b1 < ... < T"


def check_boundaries(boundaries, key: str = "segments.boundaries") -> tuple[int, ...]:
    """Returns the boundaries as a tuple of ints or raises a one-line ConfigError naming ``key``."""
    if hasattr(boundaries, "tolist"):  # numpy array / tensor
        boundaries = boundaries.tolist()
    if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
        raise ConfigError(f"{key}: expected a list of integers, got {boundaries!r}; {_HINT}")
    b = list(boundaries)
    for i, v in enumerate(b):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ConfigError(f"{key}: entry {i} is not an integer ({v!r}); {_HINT}")
    if len(b) < 2:
        raise ConfigError(f"{key}: need at least 2 entries (one segment), got {b}; {_HINT}")
    if b[0] != 0:
        raise ConfigError(f"{key}: must start at 0, got {b[0]}; {_HINT}")
    for i in range(1, len(b)):
        if b[i] == b[i - 1]:
            raise ConfigError(f"{key}: empty segment {i - 1} ([{b[i - 1]}, {b[i]})); {_HINT}")
        if b[i] < b[i - 1]:
            raise ConfigError(f"{key}: not strictly increasing at index {i} ({b[i - 1]} >= {b[i]}); {_HINT}")
    return tuple(int(v) for v in b)
