"""Tune search spaces for O2MKD: space files, ordered cut points, and a Tune sample -> a validated Config.

A space file (``tune_spaces/*.yaml``) is plain YAML over config keys, plus ``budget:`` (per-trial overrides)
and ``search:`` (algorithm, scheduler, objective, ...); see :mod:`o2mkd_ray.tune.search` for the run and the file
format.

Ordered cuts work with any search algorithm (no search algorithm has to know the constraint): the space holds ``max n`` weights ``w_i ~ U(0, 1)``;
a trial with n segments puts its n-1 cuts at the normalised cumulative sums of the first n weights, mapped
into ``[low·T, high·T]`` on integer timesteps with at least ``min_gap·T`` (and >= 1) timesteps per segment, so
every sample gives strictly increasing boundaries ``0 < b_1 < ... < T`` with no empty segment.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from o2mkd_ray.config.loading import from_dict, known_keys, set_dotted
from o2mkd_ray.config.schema import Config
from o2mkd_ray.errors import ConfigError

SCALAR_DISTS = ("choice", "grid", "uniform", "loguniform", "randint")


# per segment: no grid (a grid over max-n values would repeat configs for smaller n)
DISTRIBUTIONS = (*SCALAR_DISTS, *(f"per_segment_{d}" for d in SCALAR_DISTS if d != "grid"), "ordered_cuts")


PER_SEGMENT_KEYS = ("students.width", "students.layers_per_block")


CUTS_KEY = "segments.boundaries"


CUTS_DEFAULTS = {"low": 0.0, "high": 1.0, "min_gap": 0.02}


SEARCH_DEFAULTS: dict[str, Any] = {
    "algorithm": "random",  # random | grid | optuna | hyperopt
    "scheduler": "asha",  # asha | median | none
    "objective": "agreement",  # agreement | fidelity (alias: metric)
    "num_samples": 8,
    "grace_period": None,  # steps; default the trials' first report (train.checkpoint_every)
    "reduction_factor": 2,
    "min_samples_required": 3,  # median stopping
    "seed": 0,
    "max_concurrent": None,  # default: from the cluster's CPUs/GPUs (max_concurrent_trials)
    "eval_samples": 256,  # agreement: (x_0, ε, t) draws
    "eval_images": None,  # fidelity: images (default eval.num_images)
    "eval_steps": None,  # fidelity: DDIM steps (default eval.steps)
}


INDEXED_KEY = re.compile(r"^(?P<key>[A-Za-z0-9_.]+)\[(?P<i>\d+)\]$")


@dataclasses.dataclass
class Param:
    """One tuned config key: ``dist`` (a name in :data:`DISTRIBUTIONS`) with its ``args``."""

    key: str
    dist: str
    args: Any

    @property
    def per_segment(self) -> bool:
        return self.dist.startswith("per_segment_")

    @property
    def base_dist(self) -> str:
        return self.dist.removeprefix("per_segment_")


@dataclasses.dataclass
class SearchSpace:
    """A parsed space file: ``params`` (tuned keys), ``budget`` (dotted per-trial overrides), ``search``."""

    params: dict[str, Param]
    budget: dict[str, Any]
    search: dict[str, Any]
    source: str = "<dict>"
    raw: dict = dataclasses.field(default_factory=dict)

    # ---------------------------------------------------------------------------------------------- queries

    @property
    def cuts(self) -> dict | None:
        """The ordered-cuts settings (``low``, ``high``, ``min_gap``), or None."""
        p = self.params.get(CUTS_KEY)
        return {**CUTS_DEFAULTS, **(p.args or {})} if p is not None and p.dist == "ordered_cuts" else None

    def n_values(self, base_n: int) -> list[int]:
        """The numbers of segments trials can have."""
        if "segments.n" in self.params:
            p = self.params["segments.n"]
            return sorted(set(range(*p.args) if p.dist == "randint" else p.args))
        b = self.params.get(CUTS_KEY)
        if b is not None and b.dist in ("choice", "grid"):
            return sorted({len(v) - 1 for v in b.args})
        return [base_n]

    def param_space(self, base_n: int) -> dict:
        """The Tune ``param_space``: flat keys, ``key[i]`` for per-segment values and cut weights."""
        from ray import tune

        grid = self.search["algorithm"] == "grid"
        max_n = max(self.n_values(base_n))

        def domain(dist: str, args):
            if dist == "choice":
                return tune.grid_search(list(args)) if grid else tune.choice(list(args))
            if dist == "grid":
                return tune.grid_search(list(args))
            return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[dist](*args)

        space: dict[str, Any] = {}
        for p in self.params.values():
            if p.dist == "ordered_cuts":
                space[p.key] = {"ordered_cuts": self.cuts}  # a constant: resolve_trial_config reads it
                space.update({f"{p.key}[{i}]": tune.uniform(0.0, 1.0) for i in range(max_n)})
            elif p.per_segment:  # sampled even with algorithm grid (see DISTRIBUTIONS)
                space.update({f"{p.key}[{i}]": tune.choice(list(p.args)) if p.base_dist == "choice"
                              else domain(p.base_dist, p.args) for i in range(max_n)})
            else:
                space[p.key] = domain(p.dist, p.args)
        return space

    def constants(self) -> dict:
        """Constant entries of :meth:`param_space` (merged into every trial's config)."""
        return {CUTS_KEY: {"ordered_cuts": self.cuts}} if self.cuts is not None else {}


def _flat_budget(d: dict, prefix: str = "") -> dict[str, Any]:
    known = set(known_keys())
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key not in known and isinstance(v, dict) and any(x.startswith(key + ".") for x in known):
            out.update(_flat_budget(v, key))
        else:
            out[key] = v
    return out


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known_keys(), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown config key '{key}'{hint}")


def _numbers(args, key: str, dist: str, ints: bool = False) -> list:
    if not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool)
                                                               for a in args)):
        raise ConfigError(f"space {key}: {dist} takes [low, high], got {args!r}")
    lo, hi = args
    if ints and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"space {key}: randint takes integers [low, high), got {args!r}")
    if not lo < hi:
        raise ConfigError(f"space {key}: {dist} needs low < high, got {args!r}")
    if dist == "loguniform" and lo <= 0:
        raise ConfigError(f"space {key}: loguniform needs low > 0, got {args!r}")
    return [lo, hi]


def _parse_param(key: str, spec: Any, where: str) -> Param:
    if key not in known_keys():
        raise _unknown_key(key, where)
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise ConfigError(f"{where} {key}: expected one distribution such as {{choice: [...]}}, got {spec!r} "
                          "(fixed values go in the budget: section or the config)")
    dist, args = next(iter(spec.items()))
    if dist not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(dist), DISTRIBUTIONS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where} {key}: unknown distribution '{dist}'{hint}; known: {', '.join(DISTRIBUTIONS)}")
    p = Param(key, dist, args)
    base = p.base_dist
    if p.per_segment and key not in PER_SEGMENT_KEYS:
        raise ConfigError(f"{where} {key}: {dist} works on per-segment keys ({', '.join(PER_SEGMENT_KEYS)}) only")
    if dist == "ordered_cuts":
        if key != CUTS_KEY:
            raise ConfigError(f"{where} {key}: ordered_cuts works on {CUTS_KEY} only")
        args = {} if args is None else args
        if not isinstance(args, dict) or set(args) - set(CUTS_DEFAULTS):
            raise ConfigError(f"{where} {key}: ordered_cuts takes a mapping with keys "
                              f"{', '.join(CUTS_DEFAULTS)}, got {args!r}")
        a = {**CUTS_DEFAULTS, **args}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in a.values()):
            raise ConfigError(f"{where} {key}: ordered_cuts low/high/min_gap must be numbers, got {args!r}")
        if not 0 <= a["low"] < a["high"] <= 1 or not 0 <= a["min_gap"] < 1:
            raise ConfigError(f"{where} {key}: ordered_cuts needs 0 <= low < high <= 1 and 0 <= min_gap < 1 "
                              f"(fractions of T), got {args!r}")
        p.args = {k: float(v) for k, v in a.items()}
        return p
    if base in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where} {key}: {dist} takes a non-empty list, got {args!r}")
    else:
        p.args = _numbers(args, key, dist, ints=base == "randint")
    if key == "segments.n":
        vals = list(range(*p.args)) if base == "randint" else p.args
        if base not in ("choice", "grid", "randint") or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in vals):
            raise ConfigError(f"{where} segments.n: needs choice, grid or randint of integers >= 1, got {spec!r}")
    if key == CUTS_KEY and base not in ("choice", "grid"):
        raise ConfigError(f"{where} {key}: use {{ordered_cuts: {{low, high, min_gap}}}} or a choice of explicit "
                          f"boundary lists, got {dist}")
    if key == "segments.fractions":
        raise ConfigError(f"{where} segments.fractions: tune {CUTS_KEY} with ordered_cuts instead")
    return p


def parse_space(data: dict, source: str = "<dict>") -> SearchSpace:
    """Parses a space mapping (the content of a space file). Raises ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"space {source}: top level must be a mapping of config keys (plus budget:, search:)")
    where = f"space {source}"
    raw = copy.deepcopy(data)
    budget = data.get("budget") or {}
    search = data.get("search") or {}
    if not isinstance(budget, dict) or not isinstance(search, dict):
        raise ConfigError(f"{where}: budget: and search: must be mappings")
    budget = _flat_budget(budget)
    for k in budget:
        if k not in known_keys() and not k.startswith(("students.unet.", "ray.segment_overrides.", "debug.")):
            raise _unknown_key(k, f"{where} budget")
    search = dict(search)
    if "metric" in search:
        search.setdefault("objective", search.pop("metric"))
    unknown = sorted(set(search) - set(SEARCH_DEFAULTS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(SEARCH_DEFAULTS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where} search: unknown setting '{unknown[0]}'{hint}; known: {', '.join(SEARCH_DEFAULTS)}")
    s = {**SEARCH_DEFAULTS, **search}
    for key, allowed in (("algorithm", ("random", "grid", "optuna", "hyperopt")), ("scheduler", ("asha", "median",
                                                                                                 "none")),
                         ("objective", ("agreement", "fidelity"))):
        if s[key] not in allowed:
            raise ConfigError(f"{where} search.{key}: must be one of {', '.join(allowed)}, got {s[key]!r}")
    for key in ("num_samples", "grace_period", "min_samples_required", "max_concurrent", "eval_samples",
                "eval_images", "eval_steps"):
        v = s[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{where} search.{key}: must be an integer >= 1, got {v!r}")
    if not isinstance(s["reduction_factor"], (int, float)) or s["reduction_factor"] <= 1:
        raise ConfigError(f"{where} search.reduction_factor: must be > 1, got {s['reduction_factor']!r}")
    params = {}
    for key, spec in data.items():
        if key in ("budget", "search"):
            continue
        if key in budget:
            raise ConfigError(f"{where} {key}: both tuned and fixed in budget:; keep one")
        params[key] = _parse_param(str(key), spec, where)
    if not params:
        raise ConfigError(f"{where}: no tuned keys; add e.g. `segments.n: {{choice: [2, 3, 4]}}`")
    if "segments.n" in params and CUTS_KEY in params and params[CUTS_KEY].dist != "ordered_cuts":
        raise ConfigError(f"{where}: segments.n and explicit {CUTS_KEY} choices both decide n; use ordered_cuts")
    if s["algorithm"] in ("optuna", "hyperopt") and any(p.base_dist == "grid" for p in params.values()):
        raise ConfigError(f"{where}: search.algorithm={s['algorithm']} cannot take grid: entries; use choice:")
    return SearchSpace(params, budget, s, source, raw)


def load_space(path: str | Path | dict | SearchSpace) -> SearchSpace:
    """Loads and parses a space file (``tune_spaces/*.yaml``); a dict or SearchSpace passes through."""
    if isinstance(path, SearchSpace):
        return path
    if isinstance(path, dict):
        return parse_space(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"space file {str(p)!r} does not exist; pass a YAML file such as "
                          "tune_spaces/boundaries_widths.yaml")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"space file {str(p)!r}: not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse_space(data, str(p))


def cut_room(n: int, T: int, low: float, high: float, min_gap: float) -> tuple[int, int, int]:
    """``(L, g, S)``: first cut position, gap and free room for n-1 cuts (S < 0: infeasible)."""
    g = max(1, math.ceil(min_gap * T - 1e-9))
    lo = max(math.ceil(low * T - 1e-9), g)
    hi = min(math.floor(high * T + 1e-9), T - g)
    return lo, g, hi - lo - (n - 2) * g


def cuts_from_weights(weights, n: int, T: int, low: float = 0.0, high: float = 1.0, min_gap: float = 0.02) -> list[int]:
    """Boundaries ``[0, b_1, ..., T]`` for n segments from n non-negative weights (see the module docstring).

    Cut i sits at ``L + (i-1)·g + floor(c_i·S)``, ``c_i`` the normalised cumulative sum of the first i
    weights: strictly increasing, gaps >= g, all cuts inside ``[max(low·T, g), min(high·T, T-g)]``.
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
    """Inverse of :func:`cuts_from_weights` (``max_n`` weights, extra ones 0.5): expresses given boundaries as a
    point of the space (for ``points_to_evaluate``). Boundaries outside the space's room move to its edge."""
    n = len(boundaries) - 1
    if n == 1:
        return [1.0] + [0.5] * (max_n - 1)
    lo, g, room = cut_room(n, T, low, high, min_gap)
    d = np.maximum.accumulate(np.clip([b - lo - i * g for i, b in enumerate(boundaries[1:-1])], 0, max(room, 0)))
    c = d / room if room > 0 else np.zeros(n - 1)
    w = np.diff(np.concatenate([[0.0], c, [1.0]]))
    return [float(x) for x in w] + [0.5] * (max_n - n)


def to_builtin(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (list, tuple)):
        return [to_builtin(x) for x in v]
    if isinstance(v, dict):
        return {k: to_builtin(x) for k, x in v.items()}
    return v


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
    base_cfg = from_dict(data)
    n0 = base_cfg.segments.n
    b0 = list(Segments.from_config(base_cfg.segments, T).boundaries)
    weights = indexed.pop(CUTS_KEY, None)
    if CUTS_KEY in plain:
        boundaries = [int(b) for b in plain.pop(CUTS_KEY)]
        plain.pop("segments.n", None)
    else:
        n = int(plain.pop("segments.n", n0))
        if weights is not None:
            if any(i not in weights for i in range(n)):
                raise ConfigError(f"{CUTS_KEY}: {n} segments need weights {CUTS_KEY}[0..{n - 1}]")
            boundaries = cuts_from_weights([weights[i] for i in range(n)], n, T, **(cuts or CUTS_DEFAULTS))
        elif n != n0:
            boundaries = list(Segments.uniform(T, n).boundaries)
        else:
            boundaries = b0
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
    """The base config dict with the space's per-trial ``budget`` overrides; ConfigError on a bad value."""
    data = json.loads(json.dumps(base.to_dict() if isinstance(base, Config) else base))
    for k, v in budget.items():
        set_dotted(data, k, v)
    try:
        from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"space budget: {e}") from None
    return data


def sample_point(param_space: dict, rng: np.random.Generator) -> dict:
    """One random point of a Tune ``param_space`` without Tune's machinery (grid entries: a random element)."""
    from ray.tune.search.sample import Domain

    out = {}
    for k, v in param_space.items():
        if isinstance(v, dict) and set(v) == {"grid_search"}:
            out[k] = v["grid_search"][int(rng.integers(len(v["grid_search"])))]
        elif isinstance(v, Domain):
            out[k] = to_builtin(v.sample(random_state=rng))
        else:
            out[k] = copy.deepcopy(v)
    return out


def check_space(space: SearchSpace, base: dict, T: int, samples: int = 32, seed: int = 0) -> None:
    """Resolves ``samples`` random points (and every n) against ``base``; raises the first ConfigError, before any
    Ray work."""
    base_n = from_dict(base).segments.n
    ns = space.n_values(base_n)
    if space.cuts is not None:
        for n in ns:
            if cut_room(n, T, **space.cuts)[2] < 0:
                cuts_from_weights([1.0] * n, n, T, **space.cuts)  # raises with the explanation
    ps = space.param_space(base_n)
    rng = np.random.default_rng(seed)
    points = [sample_point(ps, rng) for _ in range(samples)]
    if "segments.n" in ps:
        for n, p in zip(ns, points):
            p["segments.n"] = n
    for p in points:
        try:
            resolve_trial_config(base, p, T)
        except ConfigError as e:
            raise ConfigError(f"space {space.source}: a sample gives an invalid config: {e}") from None


def check_students(space: SearchSpace, teacher, base: dict) -> None:
    """Builds (on the meta device) a student for every width / layers value the space can give; ConfigError when
    one cannot exist (e.g. a width that leaves a block 0 channels)."""
    import torch

    from o2mkd_ray.core.students import build_student

    st = from_dict(base).students
    vals: dict[str, list] = {}
    for key in PER_SEGMENT_KEYS:
        p = space.params.get(key)
        if p is not None:
            vals[key] = list(p.args) if p.base_dist in ("choice", "grid") else \
                list(range(*p.args)) if p.base_dist == "randint" else list(p.args)
    for key, values in vals.items():
        for v in values:
            width = v if key == "students.width" else (st.width if not isinstance(st.width, list) else st.width[0])
            layers = v if key == "students.layers_per_block" else None
            with torch.device("meta"):
                try:
                    build_student(teacher, width, layers, st.unet, "scratch")
                except ConfigError as e:
                    raise ConfigError(f"space {space.source} {key}: value {v!r}: {e}") from None


def flatten_keys(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and key not in ("students.unet", "ray.segment_overrides", "debug"):
            out.update(flatten_keys(v, key))
        else:
            out[key] = v
    return out
