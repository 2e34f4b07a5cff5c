"""A Tune sample -> a validated Config: flat keys (``key[i]`` per segment), ordered cuts, the per-trial budget.
"""

from __future__ import annotations

import functools
import json
import re
from collections import defaultdict
from typing import Any

import numpy as np

from o2mkd_ray.config.loading import from_dict, known_keys, set_dotted
from o2mkd_ray.config.schema import Config
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.tune.cuts import CUTS_DEFAULTS, CUTS_KEY, cuts_from_weights

INDEXED_KEY = re.compile(r"^(?P<key>[A-Za-z0-9_.]+)\[(?P<i>\d+)\]$")


@functools.cache
def _config_keys() -> frozenset[str]:
    return frozenset(known_keys())


def config_leaves(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config mapping as ``{dotted config key: value}``, down to the config's own leaf keys.

    Unlike :func:`o2mkd_ray.tracking.redaction.flatten` (every nested mapping), this keeps the mapping-valued
    config keys (``students.unet``, ``ray.segment_overrides``, ``debug``) whole: a space can tune them, and
    their value is what a trial's row and ``best.yaml`` need. Keys the config does not know stay as given, so
    that a caller can name them in an error.

    Args:
        d: a config dict (or part of one under ``prefix``).
    Returns:
        The flat mapping.
    """
    known = _config_keys()
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key not in known and isinstance(v, dict) and any(x.startswith(key + ".") for x in known):
            out.update(config_leaves(v, key))
        else:
            out[key] = v
    return out


def to_builtin(v):
    """``v`` with numpy scalars turned into Python ones, inside lists, tuples and dicts too (JSON, YAML, Config)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [to_builtin(x) for x in v]
    if isinstance(v, dict):
        return {k: to_builtin(x) for k, x in v.items()}
    return v


def _split_sample(sampled: dict) -> tuple[dict, dict[str, dict[int, Any]], dict | None]:
    # plain keys, per-index values (``key[i]``) and the ordered-cuts settings of a Tune sample
    plain: dict[str, Any] = {}
    indexed: dict[str, dict[int, Any]] = defaultdict(dict)
    cuts = None
    for key, v in sampled.items():
        v = to_builtin(v)
        m = INDEXED_KEY.match(str(key))
        if m:
            indexed[m["key"]][int(m["i"])] = v
        elif key == CUTS_KEY and isinstance(v, dict) and "ordered_cuts" in v:
            cuts = {**CUTS_DEFAULTS, **(v["ordered_cuts"] or {})}
        else:
            plain[key] = v
    return plain, indexed, cuts


def _trial_boundaries(base_cfg: Config, plain: dict, weights: dict[int, float] | None, cuts: dict | None,
                      T: int) -> list[int]:
    # explicit boundaries win; else n cuts from the weights; else equal segments for a new n; else the base's
    # (checked against T first in every case: a base whose segments do not fit the teacher is an error)
    from o2mkd_ray.core.segments import Segments

    base_boundaries = list(Segments.from_config(base_cfg.segments, T).boundaries)
    if CUTS_KEY in plain:
        plain.pop("segments.n", None)
        return [int(b) for b in plain.pop(CUTS_KEY)]
    n = int(plain.pop("segments.n", base_cfg.segments.n))
    if weights is not None:
        if any(i not in weights for i in range(n)):
            raise ConfigError(f"{CUTS_KEY}: {n} segments need weights {CUTS_KEY}[0..{n - 1}]")
        return cuts_from_weights([weights[i] for i in range(n)], n, T, **(cuts or CUTS_DEFAULTS))
    if n != base_cfg.segments.n:
        return list(Segments.uniform(T, n).boundaries)
    return base_boundaries


def resolve_trial_config(base_cfg_dict: dict | Config, sampled: dict, T: int) -> Config:
    """Turns a Tune sample into a validated Config with explicit ``segments.boundaries``.

    Args:
        base_cfg_dict: the base config (dict or Config); its per-trial budget already applied when wanted.
        sampled: a trial's Tune config: ``{"segments.n": 3, "segments.boundaries[0]": 0.4, ...,
            "students.width[0]": 0.5, "kd.lambda_feat": 2.0}`` (cut settings under ``"segments.boundaries":
            {"ordered_cuts": {...}}``, else the defaults); plain values such as ``"segments.boundaries":
            [0, 300, 1000]`` or ``"students.width": [0.5, 0.25]`` work too.
        T: the teacher scheduler's ``num_train_timesteps``.
    Returns:
        The validated Config (``segments.n`` = number of boundaries - 1, ``segments.fractions`` None).
    Raises:
        ConfigError: a value the config rejects.
    """
    from o2mkd_ray.core.segments import Segments

    base = base_cfg_dict.to_dict() if isinstance(base_cfg_dict, Config) else base_cfg_dict
    data = json.loads(json.dumps(base or {}))
    plain, indexed, cuts = _split_sample(sampled)
    boundaries = _trial_boundaries(from_dict(data), plain, indexed.pop(CUTS_KEY, None), cuts, T)
    seg = Segments(boundaries)
    if seg.num_train_timesteps != T:
        raise ConfigError(f"{CUTS_KEY}: must end at T={T}, got {boundaries}")
    data.setdefault("segments", {}).update(n=seg.n, boundaries=list(seg.boundaries), fractions=None)
    for key, vals in indexed.items():
        if any(i not in vals for i in range(seg.n)):
            raise ConfigError(f"{key}: {seg.n} segments need values {key}[0..{seg.n - 1}]")
        set_dotted(data, key, [vals[i] for i in range(seg.n)])
    for key, v in plain.items():
        set_dotted(data, key, v)
    return from_dict(data)


def apply_budget(base: dict | Config, budget: dict) -> dict:
    """The base config with the space's per-trial overrides.

    Args:
        base: the base config (dict or Config).
        budget: dotted overrides (a space's ``budget:``).
    Returns:
        A new config dict.
    Raises:
        ConfigError: a value the config rejects (named ``space budget: ...``).
    """
    data = json.loads(json.dumps(base.to_dict() if isinstance(base, Config) else base))
    for k, v in budget.items():
        set_dotted(data, k, v)
    try:
        from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"space budget: {e}") from None
    return data
