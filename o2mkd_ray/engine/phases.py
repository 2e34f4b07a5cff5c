"""Named phase timings of a run (report.json's ``phases``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


class PhaseTimer:
    """Records how long each named phase took, in seconds.

    Example::

        timer = PhaseTimer()
        with timer.phase("load_s"):
            ...
        timer.phases  # {"load_s": 1.2}
    """

    def __init__(self):
        self.phases: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block as ``name`` (added to an earlier time of that name); recorded even if the block raises."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - t0
