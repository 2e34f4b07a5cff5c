"""Atomic writes for every file and folder a run writes: a reader (a resuming run, a concurrent ``eval``, a user)
sees the old version or the new one, never a half-written file, even when the writer is killed mid-write.

The new content goes to a temporary sibling first (same folder, so the same filesystem), is flushed to disk, and
then replaces the target with ``os.replace`` (atomic on POSIX for files; for a folder, the old one is moved aside
first and removed after).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def replace_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``path`` to write; when the block ends without error it is flushed to disk and
    put in place of ``path`` (``os.replace``). On an error it is removed and ``path`` is left as it was.

    Example::

        with replace_file(cache / "cond.safetensors") as tmp:
            safetensors.torch.save_file(tensors, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see :func:`replace_file`); returns the path."""
    with replace_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, indent: int | None = 2, default=str) -> Path:
    """Writes ``obj`` as JSON atomically (see :func:`write_text`); values JSON cannot hold go through ``default``."""
    return write_text(path, json.dumps(obj, indent=indent, default=default))


@contextlib.contextmanager
def replace_dir(dest: str | Path) -> Iterator[Path]:
    """Builds a folder in a temporary sibling and puts it in place of ``dest`` when the block ends without error.

    Example::

        with replace_dir(out / "segments" / "seg-00") as tmp:
            shutil.copytree(ckpt / "ema", tmp / "ema")
            write_json(tmp / "summary.json", summary)

    On an error the temporary folder is removed and ``dest`` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)  # a crash here leaves dest missing but both copies on disk; never a mix
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
