"""What a run prints while it trains: one progress line per segment (throttled, with an ETA) or, on a terminal,
one tqdm bar per segment; warnings that need the user's action; segment completion.

Fed with every live-metrics event and every checkpoint report of every segment (``listener(segment, metrics)``),
on the driver, from the progress relay's thread.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class ConsoleProgress:
    """A progress listener for the console.

    Args:
        total_steps: ``train.steps``: every segment's budget, or a list of one budget per segment.
        every_s: at most one line per segment this often for live metrics (checkpoint reports always print).
        stream: where to print (default stdout); a terminal gets tqdm bars instead of lines.
        bars: force bars on (True) or off (False); None: bars when ``stream`` is a terminal.
    """

    def __init__(self, total_steps: int | list[int], every_s: float = 10.0, stream: TextIO | None = None,
                 bars: bool | None = None):
        self.totals = [int(s) for s in total_steps] if isinstance(total_steps, list) else None
        self.total = int(total_steps) if self.totals is None else max(self.totals)
        self.every_s = every_s
        self.stream = stream or sys.stdout
        self.bars_on = self.stream.isatty() if bars is None else bars
        self._bars: dict = {}
        self._first: dict[int, tuple[float, int]] = {}
        self._last_line: dict[int, float] = {}
        self._lock = threading.Lock()

    def __call__(self, k: int, m: dict) -> None:
        with self._lock:
            if m.get("kind") == "warning":
                self._print(f"[seg-{k:02d}] warning: {m.get('message')}")
                return
            step, now = int(m.get("step", 0)), float(m.get("time") or time.time())
            first_t, first_step = self._first.setdefault(k, (now, step))
            rate = (step - first_step) / (now - first_t) if now > first_t and step > first_step else None
            if self.bars_on:
                self._bar(k, step, m)
            elif m.get("kind") != "log" or now - self._last_line.get(k, 0.0) >= self.every_s:
                self._last_line[k] = now
                self._print(self._line(k, step, m, rate))
            if m.get("kind") != "log" and step >= self._total(k):
                self._print(f"[seg-{k:02d}] finished: {step} steps, loss {m.get('loss_avg', float('nan')):.4f}")

    def _total(self, k: int) -> int:
        return self.totals[k] if self.totals is not None and k < len(self.totals) else self.total

    def _line(self, k: int, step: int, m: dict, rate: float | None) -> str:
        loss = m.get("loss_avg", m.get("loss"))
        total = self._total(k)
        parts = [f"[seg-{k:02d}] step {step:>6}/{total}", f"loss {loss:.4f}" if loss is not None else ""]
        if m.get("kind") != "log" and m.get("val_loss") is not None:
            parts.append(f"val {m['val_loss']:.4f}")
        if m.get("samples_per_s") is not None:
            parts.append(f"{m['samples_per_s']:.0f} samples/s")
        if rate and step < total:
            parts.append(f"ETA {_eta((total - step) / rate)}")
        return "  ".join(p for p in parts if p)

    def _bar(self, k: int, step: int, m: dict) -> None:
        from tqdm.auto import tqdm

        bar = self._bars.get(k)
        if bar is None:
            bar = self._bars[k] = tqdm(total=self._total(k), desc=f"seg-{k:02d}", position=k, file=self.stream,
                                       dynamic_ncols=True)
        bar.update(step - bar.n)
        loss = m.get("loss_avg", m.get("loss"))
        bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "?",
                        samples_s=f"{m.get('samples_per_s', 0):.0f}", refresh=False)

    def _print(self, line: str) -> None:
        if self._bars:
            from tqdm.auto import tqdm

            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        """Closes the bars (if any)."""
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def checkpoints_only(listener):
    """``listener`` restricted to checkpoint reports (Tune decides at those; live metrics would be extra rungs)."""
    if listener is None:
        return None

    def at_checkpoints(k: int, m: dict) -> None:
        if m.get("kind") is None:
            listener(k, m)

    return at_checkpoints
