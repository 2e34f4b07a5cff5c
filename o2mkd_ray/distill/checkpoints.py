"""Checkpoint folders: atomic writes, a manifest of file hashes and the config hash, verification on resume, and
the resume itself (the newest usable checkpoint of a segment).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path

from o2mkd_ray.config.schema import Config
from o2mkd_ray.errors import CheckpointError

TRAIN_STATE = "train_state.pt"
MANIFEST = "manifest.json"


def config_hash(cfg: Config) -> str:
    """Hash of the parts of the config that define what a segment's checkpoint means."""
    d = cfg.to_dict()
    keep = {k: d[k] for k in ("teacher", "segments", "students", "kd", "data")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def hash_files(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def verify_checkpoint(directory: str | Path, cfg: Config | None = None) -> dict:
    """Checks a checkpoint's manifest and file hashes (and config hash when ``cfg`` is given); returns the manifest."""
    directory = Path(directory)
    mf = directory / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"checkpoint {str(directory)!r}: no {MANIFEST}; not an o2mkd-ray checkpoint")
    try:
        manifest = json.loads(mf.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {str(directory)!r}: {MANIFEST} is corrupted") from None
    actual = hash_files(directory)
    for name, digest in manifest.get("files", {}).items():
        if actual.get(name) != digest:
            raise CheckpointError(f"checkpoint {str(directory)!r}: {name} is missing or truncated (hash mismatch)")
    if cfg is not None and manifest.get("config_hash") != config_hash(cfg):
        raise CheckpointError(f"checkpoint {str(directory)!r} was written by a different config")
    return manifest


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint after ``step`` steps (the name Ray Train gives its folders too)."""
    return f"checkpoint_{step:06d}"


def restore_checkpoint(dist, ckpt, cfg: Config | None = None) -> int:
    """Loads a checkpoint into ``dist``; on a bad one, warns and falls back to the newest good sibling folder.

    Args:
        dist: a :class:`~o2mkd_ray.distill.distiller.SegmentDistiller` (its ``load`` verifies the checkpoint
            against its own config).
        ckpt: a checkpoint folder, or an object with ``as_directory()`` (``ray.train.Checkpoint``).
        cfg: unused; kept for callers written against the earlier signature.
    Returns:
        The step training resumes from (0: no usable checkpoint, the initial weights are kept).
    """
    bad = (CheckpointError, OSError, RuntimeError, KeyError, ValueError)
    opened = ckpt.as_directory() if hasattr(ckpt, "as_directory") else contextlib.nullcontext(str(ckpt))
    with opened as d:
        try:
            dist.load(d)
            return dist.step
        except bad as e:
            warnings.warn(f"checkpoint {d} is unusable ({e}); trying an earlier one")
            for s in sorted(Path(d).parent.glob("checkpoint_*"), reverse=True):
                if s.resolve() == Path(d).resolve():
                    continue
                try:
                    dist.load(s)
                    warnings.warn(f"resumed from earlier checkpoint {s.name} (step {dist.step})")
                    return dist.step
                except bad:
                    continue
    warnings.warn("no usable checkpoint; starting this segment from its initial weights")
    return 0
