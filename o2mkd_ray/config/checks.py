"""Rules the field types cannot say, as small functions the models' validators call, and checks of the world
outside the config (paths, Ray address).

Each raises a one-line ConfigError naming the key. Nothing here writes anything or imports torch.
"""

from __future__ import annotations

import difflib
import numbers
import os
from collections.abc import Sequence
from pathlib import Path

from o2mkd_ray.errors import ConfigError


def check_teacher_source(pretrained: str | None, factory: str | None) -> None:
    """A teacher comes from a folder/id or from a ``module:function`` factory, not both."""
    if pretrained and factory:
        raise ConfigError("teacher: set either teacher.pretrained or teacher.factory, not both")
    if factory is not None and (":" not in factory or not all(factory.split(":", 1))):
        raise ConfigError(f"teacher.factory: expected 'module:function', got {factory!r}")


def check_fractions(fractions: list[float]) -> None:
    """Cut points increase strictly inside (0, 1); the message names the first bad index."""
    prev = 0.0
    for i, f in enumerate(fractions):
        if not prev < f < 1.0:
            raise ConfigError(f"segments.fractions[{i}]: cut points must increase strictly inside (0, 1), got {f}")
        prev = f


def check_widths(width: float | list[float]) -> None:
    """Each width multiplier is in (0, 4]."""
    for w in width if isinstance(width, list) else [width]:
        if not 0 < w <= 4:
            raise ConfigError(f"students.width: multiplier must be in (0, 4], got {w}")


def check_depths(depth: float | list[float] | None) -> None:
    """Each depth multiplier (the share of a transformer teacher's blocks a student keeps) is in (0, 1]."""
    for d in depth if isinstance(depth, list) else [depth]:
        if d is not None and not 0 < d <= 1:
            raise ConfigError(f"students.depth: the share of the teacher's blocks kept must be in (0, 1], got {d}")


def check_layers(layers_per_block: int | list[int] | None, key: str = "students.layers_per_block") -> None:
    """Each layer count given is >= 1."""
    for v in layers_per_block if isinstance(layers_per_block, list) else [layers_per_block]:
        if v is not None and v < 1:
            raise ConfigError(f"{key}: must be >= 1, got {v}")


def check_per_segment(width: float | list[float], layers_per_block: int | list[int] | None, n: int) -> None:
    """Per-segment lists of the students section have one entry per segment."""
    if isinstance(width, list) and len(width) != n:
        raise ConfigError(f"students.width: got {len(width)} widths for {n} segments; give one number or {n}")
    if isinstance(layers_per_block, list) and len(layers_per_block) != n:
        raise ConfigError(f"students.layers_per_block: got {len(layers_per_block)} values for {n} segments")


def check_segment_steps(steps: int | list[int], n: int) -> None:
    """A per-segment ``train.steps`` list has one budget per segment."""
    if isinstance(steps, list) and len(steps) != n:
        raise ConfigError(f"train.steps: got {len(steps)} budgets for {n} segments; give one number or {n}")


def check_data_source(kind: str, path: str | None, name: str | None) -> None:
    """An image folder needs data.path; torchvision and HF datasets need data.name."""
    if kind == "image_folder" and not path:
        raise ConfigError("data.path: required for data.kind=image_folder (a folder of PNG/JPEG images)")
    if kind in ("torchvision", "hf") and not name:
        raise ConfigError(f"data.name: required for data.kind={kind} (e.g. CIFAR10)")


def check_segment_keys(keys: list[str], n: int) -> None:
    """``ray.segment_overrides`` is keyed by segment index, ``"0"`` .. ``"n-1"``."""
    for key in keys:
        if not key.isdigit() or int(key) >= n:
            raise ConfigError(f"ray.segment_overrides.{key}: keys are segment indices 0..{n - 1}")


# teacher kinds conditioned on text: they distil on captions (data.kind=prompts) in latent space
TEXT_TO_IMAGE_KINDS = ("stable_diffusion", "stable_diffusion_xl", "sd3")


# class-conditional teacher kinds: they distil on class-labelled latents (data.kind=classes)
CLASS_KINDS = ("dit",)
# every conditional teacher kind: its training data carries a condition per sample (cached once per run)
CONDITIONAL_KINDS = TEXT_TO_IMAGE_KINDS + CLASS_KINDS
# teacher kinds whose denoiser is a transformer (students shaped by students.depth / width, no UNet options)
TRANSFORMER_KINDS = ("dit", "sd3")
# flow-matching teacher kinds: continuous t = T * sigma, velocity targets, flow-matching sampling schedulers
FLOW_KINDS = ("sd3",)


def check_kinds(teacher_kind: str, data_kind: str) -> None:
    """A text-to-image teacher (Stable Diffusion, SDXL) distils on prompts (data.kind=prompts), a class-conditional
    one (DiT) on class-labelled latents (data.kind=classes), an unconditional one on images."""
    if teacher_kind in TEXT_TO_IMAGE_KINDS and data_kind != "prompts":
        raise ConfigError(f"data.kind: a Stable Diffusion teacher distils on captions; set data.kind=prompts (got "
                          f"{data_kind!r}) with data.path or data.name")
    if teacher_kind in CLASS_KINDS and data_kind != "classes":
        raise ConfigError(f"data.kind: a DiT teacher distils on class-labelled latents; set data.kind=classes (got "
                          f"{data_kind!r}), with data.path a folder of one subfolder per class, or none to let the "
                          "teacher sample them")
    if teacher_kind == "unet" and data_kind == "prompts":
        raise ConfigError("data.kind: prompts need a text-conditioned teacher; set teacher.kind=stable_diffusion "
                          "and teacher.pretrained to a Stable Diffusion folder or id")
    if teacher_kind != "auto" and teacher_kind not in CLASS_KINDS and data_kind == "classes":
        raise ConfigError("data.kind: classes need a class-conditional teacher; set teacher.pretrained to a DiT "
                          "folder (teacher.kind=dit)")


# test-only fault-injection switches. `debug` stays an open mapping (tests put other test-only values there); a key
# close to a switch name is taken for a typo and rejected.
DEBUG_SWITCHES = ("kill_worker", "kill_teacher_after_requests", "kill_driver_after_checkpoints", "marker")


def check_debug(debug: dict) -> None:
    """Checks the known fault-injection switches in ``debug``; rejects near-miss spellings of them."""
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
