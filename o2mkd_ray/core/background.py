"""Side effects kept out of a training loop: calls made by a daemon thread, batched, never blocking the caller.

A training step hands its live metrics to :meth:`BatchingSender.send` (a deque append, microseconds); a thread
delivers everything sent since its last delivery every ``interval_s`` with one call (one Ray queue round trip or
one MLflow batch instead of one per item). A delivery that raises is logged and dropped: metrics are never worth a
failed training run.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)


class BatchingSender:
    """Delivers items with ``deliver(items)`` from a daemon thread, at most every ``interval_s`` seconds.

    Args:
        deliver: called with the list of items sent since the previous delivery (never empty).
        interval_s: the longest an item waits before delivery.
        max_items: items kept when delivery falls behind (the oldest are dropped first).
    """

    def __init__(self, deliver: Callable[[list], Any], interval_s: float = 0.5, max_items: int = 10_000):
        self._deliver = deliver
        self._interval = interval_s
        self._items: collections.deque = collections.deque(maxlen=max_items)
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="o2mkd-batching-sender", daemon=True)
        self._thread.start()

    def send(self, item: Any) -> None:
        """Queues one item; returns at once."""
        self._items.append(item)

    def _flush(self) -> None:
        items = []
        while self._items:
            items.append(self._items.popleft())
        if items:
            try:
                self._deliver(items)
            except Exception as e:  # noqa: BLE001 - live metrics must never stop training
                log.warning("live metrics not delivered (%s: %s)", type(e).__name__, e)

    def _loop(self) -> None:
        while not self._closed:
            self._wake.wait(self._interval)
            self._flush()

    def close(self, timeout_s: float = 10.0) -> None:
        """Delivers what is left and stops the thread."""
        self._closed = True
        self._wake.set()
        self._thread.join(timeout_s)
        self._flush()
