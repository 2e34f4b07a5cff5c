"""Timestep segments: N contiguous pieces ``[b_k, b_{k+1})`` of ``[0, T)``, one per student.

Segment 0 is the low-noise end (small t); segment N-1 holds ``t = T-1``, where sampling starts.

Time may be continuous: flow-matching schedulers give the denoiser ``t = T * sigma`` as floats (900.22, and
``t = T`` itself at sigma = 1). One definition covers both: float t belongs to the segment with
``b_k <= t < b_{k+1}`` exactly (the boundaries are integers, so flooring t first changes no comparison), a value
on a boundary to the segment starting there, and ``t >= T`` to the last segment.
"""

from __future__ import annotations

import bisect
import json
import numbers
from collections.abc import Sequence

import torch

from o2mkd_ray.config.checks import check_boundaries
from o2mkd_ray.config.schema import SegmentsConfig
from o2mkd_ray.errors import ConfigError


class Segments:
    """Boundaries ``0 = b_0 < b_1 < ... < b_N = T``; student k owns ``t in [b_k, b_{k+1})``.

    Args:
        boundaries: ``[0, b_1, ..., T]`` (ints, strictly increasing).
    Raises:
        ConfigError: one line naming ``segments.boundaries`` and the problem.
    """

    def __init__(self, boundaries: Sequence[int]):
        self._b = check_boundaries(boundaries)
        self._inner = list(self._b[1:-1])  # the N-1 cut points; bisect/bucketize against these

    # --------------------------------------------------------------------------------------------------------
    # constructors

    @classmethod
    def uniform(cls, num_train_timesteps: int, n: int) -> Segments:
        """N equal segments; boundaries ``round(k*T/n)`` (half rounds up).

        Args:
            num_train_timesteps: T.
            n: number of segments, 1 <= n <= T.
        Returns:
            Segments.
        """
        T = num_train_timesteps
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ConfigError(f"segments.n: must be an integer >= 1, got {n!r}")
        if n > T:
            raise ConfigError(f"segments.n: {n} segments cannot fit in {T} timesteps; use n <= {T}")
        # integer form of floor(k*T/n + 1/2): strictly increasing whenever T/n >= 1 (Python's round() is not)
        return cls([(2 * k * T + n) // (2 * n) for k in range(n + 1)])

    @classmethod
    def from_fractions(cls, num_train_timesteps: int, fractions: Sequence[float]) -> Segments:
        """Segments cut at ``round(f*T)`` for each fraction f.

        Args:
            num_train_timesteps: T.
            fractions: cut points, strictly increasing inside (0, 1), e.g. ``[0.3, 0.6]`` -> 3 segments.
        Returns:
            Segments.
        """
        T = num_train_timesteps
        prev = 0.0
        for i, f in enumerate(fractions):
            if not prev < f < 1.0:
                raise ConfigError(
                    f"segments.fractions[{i}]: cut points must increase strictly inside (0, 1), got {f}"
                )
            prev = f
        cuts = [0, *(round(f * T) for f in fractions), T]
        for k in range(len(cuts) - 1):
            if cuts[k] >= cuts[k + 1]:
                raise ConfigError(
                    f"segments.fractions: with T={T} the cut points give boundaries {cuts}, where "
                    f"segment {k} is empty; spread the cut points further apart"
                )
        return cls(cuts)

    @classmethod
    def from_config(cls, seg_cfg: SegmentsConfig, num_train_timesteps: int) -> Segments:
        """Segments from the config: explicit boundaries, else fractions, else ``uniform(n)``.

        Args:
            seg_cfg: the ``segments`` config section.
            num_train_timesteps: T of the teacher's scheduler.
        Returns:
            Segments.
        """
        T = num_train_timesteps
        if seg_cfg.boundaries is not None:
            seg = cls(seg_cfg.boundaries)
            if seg.num_train_timesteps != T:
                raise ConfigError(
                    f"segments.boundaries: last value {seg.num_train_timesteps} must equal the teacher "
                    f"scheduler's num_train_timesteps ({T}); end the list with {T}"
                )
            return seg
        if seg_cfg.fractions is not None:
            return cls.from_fractions(T, seg_cfg.fractions)
        return cls.uniform(T, seg_cfg.n)

    # --------------------------------------------------------------------------------------------------------
    # queries

    @property
    def boundaries(self) -> tuple[int, ...]:
        return self._b

    @property
    def n(self) -> int:
        return len(self._b) - 1

    @property
    def num_train_timesteps(self) -> int:
        return self._b[-1]

    def range(self, k: int) -> tuple[int, int]:
        """Returns ``(lo, hi)``: segment k holds ``lo <= t < hi``."""
        if not 0 <= k < self.n:
            raise IndexError(f"segment {k} out of range; there are {self.n} segments (0..{self.n - 1})")
        return self._b[k], self._b[k + 1]

    def owner(self, t):
        """Index of the segment (student) that owns timestep t: k with ``b_k <= t < b_{k+1}``, exact for floats.

        Args:
            t: a Python/numpy number or a tensor of timesteps, any shape and dtype. Floats are floored first, which
               is exact against integer boundaries (``t >= b`` iff ``floor(t) >= b``): 900.22 goes where 900 goes,
               a value on a boundary to the segment starting there. Values are clamped into ``[0, T-1]`` (``t = T``,
               the first step of a flow-matching run, goes to the last segment).
        Returns:
            int for a number; LongTensor of t's shape (on t's device) for a tensor.
        """
        T = self.num_train_timesteps
        if torch.is_tensor(t):
            t = t.floor().long() if t.is_floating_point() else t.long()
            t = t.clamp(0, T - 1)
            inner = torch.tensor(self._inner, dtype=torch.long, device=t.device)
            return torch.bucketize(t, inner, right=True)  # counts cut points <= t
        if isinstance(t, bool) or not isinstance(t, numbers.Real):
            raise TypeError(f"owner(t): expected a number or a tensor, got {type(t).__name__}")
        t = min(max(int(t // 1), 0), T - 1)
        return bisect.bisect_right(self._inner, t)

    def sample_t(
        self, k: int, batch: int, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        """Draws timesteps uniformly from segment k (the training distribution of student k).

        Args:
            k: segment index.
            batch: number of timesteps.
            generator: optional torch.Generator for reproducibility.
            device: output device; defaults to the generator's device (else CPU).
        Returns:
            LongTensor of shape (batch,) with values in ``[lo, hi)``.
        """
        lo, hi = self.range(k)
        if device is None and generator is not None:
            device = generator.device
        return torch.randint(lo, hi, (batch,), generator=generator, device=device, dtype=torch.long)

    # --------------------------------------------------------------------------------------------------------
    # serialisation

    def to_dict(self) -> dict:
        return {"boundaries": list(self._b), "n": self.n, "num_train_timesteps": self.num_train_timesteps}

    @classmethod
    def from_dict(cls, data: dict) -> Segments:
        return cls(data["boundaries"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> Segments:
        return cls.from_dict(json.loads(text))

    def __eq__(self, other) -> bool:
        return isinstance(other, Segments) and self._b == other._b

    def __hash__(self) -> int:
        return hash(self._b)

    def __repr__(self) -> str:
        return f"Segments(boundaries={list(self._b)})"
