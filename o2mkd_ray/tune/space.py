"""Tune search spaces for O2MKD: the space file, its Tune ``param_space``, and its checks before any Ray work.

A space file (``tune_spaces/*.yaml``) is plain YAML over config keys, plus ``budget:`` (per-trial overrides)
and ``search:`` (algorithm, scheduler, objective, ...); see :mod:`o2mkd_ray.tune.search` for the run and the file
format, :mod:`o2mkd_ray.tune.cuts` for ``ordered_cuts`` and :mod:`o2mkd_ray.tune.resolve` for a sample -> Config.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from o2mkd_ray.config.loading import from_dict, known_keys
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.tune.cuts import CUTS_DEFAULTS, CUTS_KEY, cut_room, cuts_from_weights, parse_cuts
from o2mkd_ray.tune.resolve import config_leaves, resolve_trial_config, to_builtin

SCALAR_DISTS = ("choice", "grid", "uniform", "loguniform", "randint")


# per segment: no grid (a grid over max-n values would repeat configs for smaller n)
DISTRIBUTIONS = (*SCALAR_DISTS, *(f"per_segment_{d}" for d in SCALAR_DISTS if d != "grid"), "ordered_cuts")


PER_SEGMENT_KEYS = ("students.width", "students.layers_per_block")


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
    "analysis_images": 64,  # --seed-from-analysis: x_0 per timestep of the feature statistics (as analyze)
    "analysis_timesteps": 50,  # --seed-from-analysis: their timestep grid points (as analyze)
}


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

    def values(self) -> list:
        """The values of a discrete distribution (``randint``: low..high-1); a continuous one's two ends."""
        return list(range(*self.args)) if self.base_dist == "randint" else list(self.args)


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
            return sorted(set(self.params["segments.n"].values()))
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


def _hint(word: str, options) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _unknown_key(key: str, where: str) -> ConfigError:
    return ConfigError(f"{where}: unknown config key '{key}'{_hint(key, known_keys())}")


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


def _parse_distribution(key: str, spec: Any, where: str) -> Param:
    # the one {distribution: args} entry of a tuned key, its args checked for the distribution alone
    if key not in known_keys():
        raise _unknown_key(key, where)
    if not (isinstance(spec, dict) and len(spec) == 1):
        raise ConfigError(f"{where} {key}: expected one distribution such as {{choice: [...]}}, got {spec!r} "
                          "(fixed values go in the budget: section or the config)")
    dist, args = next(iter(spec.items()))
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"{where} {key}: unknown distribution '{dist}'{_hint(dist, DISTRIBUTIONS)}; known: "
                          f"{', '.join(DISTRIBUTIONS)}")
    p = Param(key, dist, args)
    if p.per_segment and key not in PER_SEGMENT_KEYS:
        raise ConfigError(f"{where} {key}: {dist} works on per-segment keys ({', '.join(PER_SEGMENT_KEYS)}) only")
    if dist == "ordered_cuts":
        if key != CUTS_KEY:
            raise ConfigError(f"{where} {key}: ordered_cuts works on {CUTS_KEY} only")
        p.args = parse_cuts(args, f"{where} {key}")
    elif p.base_dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where} {key}: {dist} takes a non-empty list, got {args!r}")
    else:
        p.args = _numbers(args, key, dist, ints=p.base_dist == "randint")
    return p


def _parse_param(key: str, spec: Any, where: str) -> Param:
    # a tuned key: its distribution, then what the segment keys allow
    p = _parse_distribution(key, spec, where)
    if key == "segments.n" and (p.dist not in ("choice", "grid", "randint") or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in p.values())):
        raise ConfigError(f"{where} segments.n: needs choice, grid or randint of integers >= 1, got {spec!r}")
    if key == CUTS_KEY and p.dist not in ("choice", "grid", "ordered_cuts"):
        raise ConfigError(f"{where} {key}: use {{ordered_cuts: {{low, high, min_gap}}}} or a choice of explicit "
                          f"boundary lists, got {p.dist}")
    if key == "segments.fractions":
        raise ConfigError(f"{where} segments.fractions: tune {CUTS_KEY} with ordered_cuts instead")
    return p


def _parse_budget(budget: dict, where: str) -> dict[str, Any]:
    budget = config_leaves(budget)
    for k in budget:
        if k not in known_keys() and not k.startswith(("students.unet.", "ray.segment_overrides.", "debug.")):
            raise _unknown_key(k, f"{where} budget")
    return budget


def _parse_search(search: dict, where: str) -> dict[str, Any]:
    search = dict(search)
    if "metric" in search:
        search.setdefault("objective", search.pop("metric"))
    unknown = sorted(set(search) - set(SEARCH_DEFAULTS))
    if unknown:
        raise ConfigError(f"{where} search: unknown setting '{unknown[0]}'{_hint(unknown[0], SEARCH_DEFAULTS)}; "
                          f"known: {', '.join(SEARCH_DEFAULTS)}")
    s = {**SEARCH_DEFAULTS, **search}
    for key, allowed in (("algorithm", ("random", "grid", "optuna", "hyperopt")),
                         ("scheduler", ("asha", "median", "none")), ("objective", ("agreement", "fidelity"))):
        if s[key] not in allowed:
            raise ConfigError(f"{where} search.{key}: must be one of {', '.join(allowed)}, got {s[key]!r}")
    for key in ("num_samples", "grace_period", "min_samples_required", "max_concurrent", "eval_samples",
                "eval_images", "eval_steps", "analysis_images", "analysis_timesteps"):
        v = s[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"{where} search.{key}: must be an integer >= 1, got {v!r}")
    if not isinstance(s["reduction_factor"], (int, float)) or s["reduction_factor"] <= 1:
        raise ConfigError(f"{where} search.reduction_factor: must be > 1, got {s['reduction_factor']!r}")
    return s


def parse_space(data: dict, source: str = "<dict>") -> SearchSpace:
    """Parses a space mapping (the content of a space file).

    Args:
        data: tuned config keys (``{key: {distribution: args}}``), plus ``budget:`` and ``search:``.
        source: its file, for messages.
    Returns:
        The :class:`SearchSpace`.
    Raises:
        ConfigError: naming the key or setting.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"space {source}: top level must be a mapping of config keys (plus budget:, search:)")
    where = f"space {source}"
    budget, search = data.get("budget") or {}, data.get("search") or {}
    if not isinstance(budget, dict) or not isinstance(search, dict):
        raise ConfigError(f"{where}: budget: and search: must be mappings")
    budget, s = _parse_budget(budget, where), _parse_search(search, where)
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
    return SearchSpace(params, budget, s, source, copy.deepcopy(data))


def load_space(path: str | Path | dict | SearchSpace) -> SearchSpace:
    """Loads and parses a space file.

    Args:
        path: a YAML file (``tune_spaces/*.yaml``), a mapping (parsed) or a :class:`SearchSpace` (as is).
    Returns:
        The :class:`SearchSpace`.
    Raises:
        ConfigError: a missing file, bad YAML, or a bad space (:func:`parse_space`).
    """
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


def sample_point(param_space: dict, rng: np.random.Generator) -> dict:
    """One random point of a Tune ``param_space`` without Tune's machinery.

    Args:
        param_space: from :meth:`SearchSpace.param_space`; rng: the generator.
    Returns:
        ``{key: value}`` (grid entries: a random element; constants: copies).
    """
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
    """Resolves ``samples`` random points (and every n) against ``base``, before any Ray work.

    Args:
        space: the parsed space; base: a config dict; T: the teacher's ``num_train_timesteps``.
        samples, seed: how many random points, drawn with which seed.
    Raises:
        ConfigError: the first sample the config rejects, or cuts that cannot fit for some n.
    """
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
    """Builds (on the meta device) a student for every width / layers value the space can give (a transformer
    teacher's: every width, at the base config's ``students.depth``).

    Args:
        space: the parsed space; teacher: the loaded teacher; base: the config dict trials start from.
    Raises:
        ConfigError: a value no student can have (e.g. a width that leaves a block 0 channels).
    """
    import torch

    from o2mkd_ray.core.students import build_student
    from o2mkd_ray.core.transformer_students import build_transformer_student, is_transformer

    st = from_dict(base).students
    depth = 1.0 if st.depth is None else (st.depth if not isinstance(st.depth, list) else min(st.depth))
    for key in (k for k in PER_SEGMENT_KEYS if k in space.params):
        for v in space.params[key].values():
            width = v if key == "students.width" else (st.width if not isinstance(st.width, list) else st.width[0])
            layers = v if key == "students.layers_per_block" else None
            with torch.device("meta"):
                try:
                    if is_transformer(teacher):
                        build_transformer_student(teacher, depth, width, "scratch")
                    else:
                        build_student(teacher, width, layers, st.unet, "scratch")
                except ConfigError as e:
                    raise ConfigError(f"space {space.source} {key}: value {v!r}: {e}") from None
