"""Ordered cut points: segment boundaries any search algorithm can sample without knowing their constraint.

The space holds ``max n`` weights ``w_i ~ U(0, 1)``; a trial with n segments puts its n-1 cuts at the normalised
cumulative sums of the first n weights, mapped into ``[low·T, high·T]`` on integer timesteps with at least
``min_gap·T`` (and >= 1) timesteps per segment, so every sample gives strictly increasing boundaries
``0 < b_1 < ... < T`` with no empty segment. A space file asks for them with
``segments.boundaries: {ordered_cuts: {low, high, min_gap}}``.
"""

from __future__ import annotations

import math

import numpy as np

from o2mkd_ray.errors import ConfigError

CUTS_KEY = "segments.boundaries"


CUTS_DEFAULTS = {"low": 0.0, "high": 1.0, "min_gap": 0.02}


def parse_cuts(args, where: str) -> dict[str, float]:
    """Validates the settings of an ``ordered_cuts`` entry.

    Args:
        args: the entry's mapping (``low``, ``high``, ``min_gap``; missing ones take :data:`CUTS_DEFAULTS`), or None.
        where: the start of error messages (``space FILE segments.boundaries``).
    Returns:
        All three settings as floats.
    Raises:
        ConfigError: an unknown setting, a non-number, or values outside ``0 <= low < high <= 1``,
            ``0 <= min_gap < 1``.
    """
    args = {} if args is None else args
    if not isinstance(args, dict) or set(args) - set(CUTS_DEFAULTS):
        raise ConfigError(f"{where}: ordered_cuts takes a mapping with keys {', '.join(CUTS_DEFAULTS)}, got {args!r}")
    a = {**CUTS_DEFAULTS, **args}
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a.values()):
        raise ConfigError(f"{where}: ordered_cuts low/high/min_gap must be numbers, got {args!r}")
    if not 0 <= a["low"] < a["high"] <= 1 or not 0 <= a["min_gap"] < 1:
        raise ConfigError(f"{where}: ordered_cuts needs 0 <= low < high <= 1 and 0 <= min_gap < 1 "
                          f"(fractions of T), got {args!r}")
    return {k: float(v) for k, v in a.items()}


def cut_room(n: int, T: int, low: float, high: float, min_gap: float) -> tuple[int, int, int]:
    """Where n-1 cuts can go.

    Returns:
        ``(L, g, S)``: the first cut's lowest position, the gap and the free room (S < 0: they do not fit).
    """
    g = max(1, math.ceil(min_gap * T - 1e-9))
    lo = max(math.ceil(low * T - 1e-9), g)
    hi = min(math.floor(high * T + 1e-9), T - g)
    return lo, g, hi - lo - (n - 2) * g


def cuts_from_weights(weights, n: int, T: int, low: float = 0.0, high: float = 1.0, min_gap: float = 0.02) -> list[int]:
    """Boundaries for n segments from n non-negative weights (see the module docstring).

    Cut i sits at ``L + (i-1)·g + floor(c_i·S)``, ``c_i`` the normalised cumulative sum of the first i
    weights: strictly increasing, gaps >= g, all cuts inside ``[max(low·T, g), min(high·T, T-g)]``.

    Args:
        weights: at least n numbers (negative ones count as 0; all 0: equal segments).
        n, T: segments and timesteps; low, high, min_gap: the space's settings (fractions of T).
    Returns:
        ``[0, b_1, ..., T]``.
    Raises:
        ConfigError: the cuts do not fit (:func:`cut_room`), or fewer than n weights.
    """
    if n == 1:
        return [0, int(T)]
    lo, g, room = cut_room(n, T, low, high, min_gap)
    if room < 0:
        raise ConfigError(f"{CUTS_KEY}: {n - 1} cuts {g} timesteps apart do not fit in [{low}, {high}]·T with "
                          f"T={T}; widen low/high, lower min_gap or the largest segments.n")
    w = [max(0.0, float(x)) for x in list(weights)[:n]]
    if len(w) < n:
        raise ConfigError(f"{CUTS_KEY}: {n} segments need {n} weights, got {len(w)}")
    total = sum(w)
    cum = np.cumsum(w)[:-1] / total if total > 0 else np.arange(1, n) / n
    return [0, *(lo + i * g + min(room, math.floor(c * room + 1e-9)) for i, c in enumerate(cum)), int(T)]


def weights_from_boundaries(boundaries, T: int, max_n: int, low: float = 0.0, high: float = 1.0,
                            min_gap: float = 0.02) -> list[float]:
    """Inverse of :func:`cuts_from_weights`: given boundaries as a point of the space (``points_to_evaluate``).

    Args:
        boundaries: ``[0, b_1, ..., T]``; cuts outside the space's room move to its edge.
        T, low, high, min_gap: as for :func:`cuts_from_weights`; max_n: the space's number of weights.
    Returns:
        ``max_n`` weights (those past the boundaries' n are 0.5).
    """
    n = len(boundaries) - 1
    if n == 1:
        return [1.0] + [0.5] * (max_n - 1)
    lo, g, room = cut_room(n, T, low, high, min_gap)
    d = np.maximum.accumulate(np.clip([b - lo - i * g for i, b in enumerate(boundaries[1:-1])], 0, max(room, 0)))
    c = d / room if room > 0 else np.zeros(n - 1)
    w = np.diff(np.concatenate([[0.0], c, [1.0]]))
    return [float(x) for x in w] + [0.5] * (max_n - n)
