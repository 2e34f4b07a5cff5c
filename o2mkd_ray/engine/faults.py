"""Test-only fault injection: the ``debug.*`` rehearsal switches that kill a train worker, the teacher actor or the
driver once, so recovery can be rehearsed on a real cluster.

Each switch is a hook built here from the config; the training code calls a hook only where one is configured, and
knows nothing about what it does. A ``marker`` file makes every fault happen once: it is written just before the
process dies, and a rerun (or Ray's restart of the process) that finds it does not die again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


def worker_hook(debug: dict, k: int, rank: int) -> Callable[[int], None] | None:
    """``debug.kill_worker = {segment, rank, step, marker}``: the hook that kills this worker after that step.

    Args:
        debug: the config's ``debug`` mapping.
        k: this worker's segment.
        rank: this worker's rank.
    Returns:
        ``hook(step)`` for the training loop's ``after_step``, or None when this worker is not the victim.
    """
    spec = (debug or {}).get("kill_worker")
    if not spec or spec.get("segment", 0) != k or spec.get("rank", 0) != rank:
        return None
    marker = spec.get("marker")

    def hook(step: int) -> None:
        if step != spec.get("step") or (marker and os.path.exists(marker)):
            return
        if marker:
            Path(marker).write_text(str(step))
        log.warning("debug.kill_worker: killing worker of segment %d rank %d at step %d", k, rank, step)
        os._exit(1)

    return hook


def teacher_fault(debug: dict, out: Path) -> dict | None:
    """``debug.kill_teacher_after_requests: N``: the spec the teacher actor gets (None: no fault).

    Args:
        debug: the config's ``debug`` mapping (``marker``: the once-only file; default ``OUT/.teacher_killed``).
        out: the run folder.
    """
    n = (debug or {}).get("kill_teacher_after_requests")
    if not n:
        return None
    return {"kill_teacher_after_requests": n, "marker": debug.get("marker", str(out / ".teacher_killed"))}


def teacher_hook(fault: dict | None) -> Callable[[int], None] | None:
    """The teacher actor's hook for :func:`teacher_fault`'s spec: ``hook(requests)`` exits the actor process once
    ``requests`` reaches N (Ray restarts it; clients retry). None when there is no spec."""
    n = (fault or {}).get("kill_teacher_after_requests")
    marker = (fault or {}).get("marker")
    if not n or not marker:
        return None

    def hook(requests: int) -> None:
        if requests >= n and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)

    return hook


def watch_driver(debug: dict, storage: str) -> None:
    """``debug.kill_driver_after_checkpoints: N``: a daemon thread that kills this driver process once ``N``
    checkpoint folders exist under ``storage`` (local storage only; cloud URIs are not watched)."""
    n = (debug or {}).get("kill_driver_after_checkpoints")
    marker = (debug or {}).get("marker")
    if not n or (marker and os.path.exists(marker)) or storage.startswith(("s3://", "gs://", "abfs://", "hdfs://")):
        return

    def watch() -> None:
        while len(list(Path(storage).glob("seg-*/checkpoint_*"))) < n:
            time.sleep(0.2)
        if marker:
            Path(marker).write_text("driver killed")
        log.warning("debug.kill_driver_after_checkpoints: killing the driver")
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()
