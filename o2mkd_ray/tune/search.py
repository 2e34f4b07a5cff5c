"""Ray Tune over segment boundaries, student widths and KD weights: one trial = one whole O2MKD run.

A space file (``tune_spaces/*.yaml``) is plain YAML over config keys, plus a ``budget:`` section (per-trial
overrides, e.g. fewer steps; ``best.yaml`` keeps the full budget) and a ``search:`` section::

    segments.n: {choice: [2, 3, 4]}
    segments.boundaries: {ordered_cuts: {low: 0.05, high: 0.95, min_gap: 0.02}}
    students.width: {per_segment_choice: [0.25, 0.5, 0.75]}
    kd.lambda_feat: {loguniform: [0.1, 10]}
    budget: {train.steps: 200, train.checkpoint_every: 25}
    search: {algorithm: random, scheduler: asha, objective: agreement, num_samples: 12}

Distributions: ``choice: [...]``, ``grid: [...]``, ``uniform: [low, high]``, ``loguniform: [low, high]``,
``randint: [low, high]`` (high exclusive, as ``tune.randint``); ``per_segment_choice`` (``_uniform``,
``_loguniform``, ``_randint``) on ``students.width`` / ``students.layers_per_block`` (one value per segment: the
space holds as many as the largest ``segments.n`` and a trial takes the first n); ``ordered_cuts`` on
``segments.boundaries``. With ``search: {algorithm: grid}`` every ``choice`` becomes a grid (per-segment values
stay sampled).

``ordered_cuts`` always gives valid, strictly increasing boundaries (:mod:`o2mkd_ray.tune.cuts`); the space
file is parsed in :mod:`o2mkd_ray.tune.space`, a sample becomes a Config in :mod:`o2mkd_ray.tune.resolve`, and
the checks before any Ray work are in :mod:`o2mkd_ray.tune.plan`.

Each trial runs :func:`o2mkd_ray.engine.driver.run_distillation` (its segments' TorchTrainers concurrently, inside
the trial) into ``OUT/tune/trials/<trial_id>``. While training, the trial reports ``quality`` = mean over
segments of the students' held-out KD loss (``val_loss``) each time every segment has reached a step, so ASHA
(``time_attr="step"``) can stop bad trials; the scheduler decides on ``val_loss`` (the same numbers), because
the final report replaces ``quality`` by the objective (teacher-agreement output MSE, or image MSE against the
teacher from the same noise; unconditional and text-to-image teachers alike,
:func:`o2mkd_ray.tune.trial.objective_value`), which is on another scale for ``fidelity``. ``cost`` = sampling MACs of one run of the
config's sampler relative to the teacher's, each step on the student owning it
(:func:`o2mkd_ray.tune.trial.sampling_cost`, ``report.json``'s ``macs_ratio_per_step``).

A trial runs its trainers without Train-level retries (``ray.max_failures = 0``) and, when the scheduler stops
it, aborts them before Tune frees the trial's resources (:mod:`o2mkd_ray.tune.stopping`), so that no
worker-group placement group outlives a stopped trial.

Outputs: ``OUT/tune/results.csv`` (one row per trial), ``OUT/tune/pareto.png`` (quality vs cost, Pareto
front), ``OUT/tune/best.yaml`` (the best finished trial as a full, ready-to-run config).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Callable

import pandas as pd

from o2mkd_ray.config.loading import from_dict
from o2mkd_ray.config.schema import Config
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.tune.cuts import CUTS_KEY, weights_from_boundaries
from o2mkd_ray.tune.plan import SearchPlan, claim_folder, plan_search, trials_need_preflight
from o2mkd_ray.tune.report import finish_search_run, results_frame, write_outputs
from o2mkd_ray.tune.resolve import INDEXED_KEY, config_leaves, resolve_trial_config
from o2mkd_ray.tune.space import SearchSpace
from o2mkd_ray.tune.trial import TRIAL_CPU, TrialContext, default_tracker, trial_trainable

log = logging.getLogger(__name__)


def max_concurrent_trials(cfg: Config, n: int, resources: dict | None = None) -> int:
    """Trials that fit at once: cluster CPUs (GPUs) ÷ what one trial with n segments asks for (its segments'
    workers, the teacher actors and the trial's own 0.01 CPU); floor, at least 1."""
    r = cfg.ray
    cpu = gpu = 0.0
    for k in range(n):
        ov = r.segment_overrides.get(str(k))
        workers = (ov.num_workers if ov and ov.num_workers else None) or r.workers_per_segment
        cpu += workers * (ov.cpus_per_worker if ov and ov.cpus_per_worker is not None else r.cpus_per_worker)
        gpu += workers * (ov.gpus_per_worker if ov and ov.gpus_per_worker is not None else r.gpus_per_worker)
    if cfg.teacher.mode == "actor":
        cpu += cfg.teacher.num_cpus * cfg.teacher.replicas
        gpu += cfg.teacher.num_gpus * cfg.teacher.replicas
    cpu += TRIAL_CPU
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    k = math.floor(resources.get("CPU", 0.0) / cpu + 1e-9)
    if gpu > 0:
        k = min(k, math.floor(resources.get("GPU", 0.0) / gpu + 1e-9))
    return max(1, k)


def _search_alg(settings: dict, points: list[dict], max_conc: int):
    # the package of optuna/hyperopt was checked with the rest of the search (plan.check_algorithm)
    alg, seed = settings["algorithm"], settings["seed"]
    if alg in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Tune ignores max_concurrent_trials (with only a warning) when given its own BasicVariantGenerator: the
        # generator's max_concurrent is what limits it
        return BasicVariantGenerator(points_to_evaluate=points or None, max_concurrent=max_conc, random_state=seed)
    from ray.tune.search import ConcurrencyLimiter

    if alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        s = OptunaSearch(metric="quality", mode="min", points_to_evaluate=points or None, seed=seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        s = HyperOptSearch(metric="quality", mode="min", points_to_evaluate=points or None, random_state_seed=seed)
    return ConcurrencyLimiter(s, max_concurrent=max_conc)


def _scheduler(settings: dict, trial_cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    steps = trial_cfg.train.max_steps  # per-segment budgets: the trial reports up to the largest
    grace = min(settings["grace_period"] or trial_cfg.train.checkpoint_every, steps)
    if settings["scheduler"] == "asha":
        return ASHAScheduler(time_attr="step", metric="val_loss", mode="min", max_t=steps, grace_period=grace,
                             reduction_factor=settings["reduction_factor"])
    if settings["scheduler"] == "median":
        return MedianStoppingRule(time_attr="step", metric="val_loss", mode="min", grace_period=grace,
                                  min_samples_required=settings["min_samples_required"])
    return FIFOScheduler()


def _fill_point(point: dict, param_space: dict, base: dict) -> dict:
    # searchers other than the basic one want complete points: take the base config's value where it fits
    from ray.tune.search.sample import Categorical, Float, Integer

    flat = config_leaves(base)
    out = dict(point)
    for k, dom in param_space.items():
        if k in out:
            continue
        m = INDEXED_KEY.match(k)
        v = flat.get(m["key"] if m else k)
        if m and isinstance(v, list):
            v = v[int(m["i"])] if int(m["i"]) < len(v) else v[-1]
        if isinstance(dom, Categorical):
            out[k] = v if v in dom.categories else dom.categories[0]
        elif isinstance(dom, (Float, Integer)):
            x = v if isinstance(v, (int, float)) and not isinstance(v, bool) else dom.lower
            hi = dom.upper - 1 if isinstance(dom, Integer) else dom.upper
            out[k] = type(dom.lower)(min(max(x, dom.lower), hi))
    return out


def seed_points(space: SearchSpace, cfg: Config, trial_base: dict, T: int, stats=None,
                out: str | Path | None = None) -> list[dict]:
    """``points_to_evaluate``: for every n of the space, the boundaries proposed from the teacher's features
    (:func:`o2mkd_ray.tune.analysis.propose_boundaries`), then the uniform ones (duplicates dropped).

    Args:
        space: the space (needs ``ordered_cuts``); cfg: the base config (teacher, data); trial_base: the config
            dict trials start from; T: the teacher's timesteps; stats: precomputed feature statistics; out: where
            the statistics of a text-to-image teacher cache its caption data (``out/cache``; None: no cache). Without
            ``stats``, :func:`~o2mkd_ray.tune.analysis.feature_stats` with the space's ``analysis_images`` and
            ``analysis_timesteps``.
    Returns:
        Points of the space's ``param_space`` (complete ones for optuna and hyperopt).
    Raises:
        ConfigError: the space has no ``ordered_cuts``.
    """
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.tune.analysis import feature_stats, propose_boundaries

    if space.cuts is None:
        raise ConfigError(f"--seed-from-analysis needs `{CUTS_KEY}: {{ordered_cuts: ...}}` in the space")
    base_n = from_dict(trial_base).segments.n
    ns = space.n_values(base_n)
    max_n = max(ns)
    if stats is None:
        stats = feature_stats(cfg, space.search["analysis_images"], space.search["analysis_timesteps"], out=out)
    seeds = [propose_boundaries(cfg, n, stats=stats) for n in ns if n > 1]
    seeds += [list(Segments.uniform(T, n).boundaries) for n in ns]
    points, seen = [], set()
    for b in seeds:
        n = len(b) - 1
        w = weights_from_boundaries(b, T, max_n, **space.cuts)
        p = {f"{CUTS_KEY}[{i}]": w[i] for i in range(max_n)}
        if "segments.n" in space.params:
            p["segments.n"] = n
        key = tuple(resolve_trial_config(trial_base, {**space.constants(), **p}, T).segments.boundaries)
        if key not in seen:
            seen.add(key)
            points.append(p)
    if space.search["algorithm"] in ("optuna", "hyperopt"):
        ps = space.param_space(base_n)
        points = [_fill_point(p, ps, trial_base) for p in points]
    return points


def run_tuning(cfg: Config, space, out: str | Path, num_samples: int | None = None, max_cost: float | None = None,
               seed_from_analysis: bool = False, resume: bool = True, tracker_factory: Callable | None = None,
               verbose: int = 0) -> pd.DataFrame:
    """Ray Tune over a space of O2MKD configs; one trial = one whole distillation run.

    Args:
        cfg: the validated base config (full budget; the space's ``budget:`` reduces it per trial).
        space: a space file path, a mapping, or a :class:`SearchSpace`.
        out: output folder; everything goes to ``out/tune/``.
        num_samples: trials (default ``search.num_samples``; ignored when resuming).
        max_cost: best.yaml takes the best finished trial whose cost is at most this.
        seed_from_analysis: the first trials use the boundaries proposed from the teacher's features and the
            uniform ones (:func:`seed_points`).
        resume: continue ``out/tune`` when it holds a search (``Tuner.restore``); False refuses such a folder.
        tracker_factory: ``factory(cfg, parent_run_id) -> RunTracker-like`` (picklable: it runs in the
            trials); default :class:`o2mkd_ray.tracking.tracker.RunTracker` when ``cfg.mlflow.enabled``.
        verbose: Tune's console verbosity (0 silent).
    Returns:
        The results table (also ``out/tune/results.csv``): one row per trial with ``trial_id, status, n,
        boundaries, widths, quality, cost, val_loss, steps, pareto, best``, the other tuned keys, ``out``.
    Raises:
        ConfigError: bad space/config/output folder (before any Ray work), a missing optuna/hyperopt, or no
            finished trial within ``max_cost`` (results.csv and pareto.png are written first).
    """
    plan = plan_search(cfg, space, out, num_samples, resume)
    seeded = seed_from_analysis and not plan.restoring
    claim_folder(plan, seed_points(plan.space, cfg, plan.trial_base, plan.T, out=plan.tdir) if seeded else [])
    if tracker_factory is None and cfg.mlflow.enabled:
        from o2mkd_ray.tracking.tracker import resolve_tracking_uri

        tracker_factory = functools.partial(default_tracker, resolve_tracking_uri(cfg, plan.out))
    parent, grid = _fit(plan, tracker_factory, verbose)
    df = results_frame(grid, plan.space, plan.trial_base, plan.T, plan.teacher, plan.shape, plan.tdir)
    try:
        best = write_outputs(df, plan.space, plan.base, plan.T, plan.tdir, max_cost, cfg.name)
    finally:
        if parent is not None:
            finish_search_run(parent, df, plan.tdir)
    log.warning("tune: %d trials, best %s", len(df), best)
    return df


def _fit(plan: SearchPlan, tracker_factory: Callable | None, verbose: int):
    # Ray started here unless it is up already; the search's own MLflow run around the Tuner. Returns that run
    # (None without tracking) and Tune's results.
    import ray

    from o2mkd_ray.engine.driver import init_ray

    parent, started = None, False
    try:
        started, _ = init_ray(plan.cfg)
        if tracker_factory is not None:
            parent = tracker_factory(plan.cfg, None)
            parent.start(plan.cfg, plan.tdir, tags={"o2mkd.kind": "tune", "o2mkd.space": plan.space.source,
                                                    "o2mkd.objective": plan.space.search["objective"]})
        ctx = TrialContext(base=plan.trial_base, constants=plan.space.constants(), T=plan.T,
                           trials_dir=str(plan.tdir / "trials"), tune_dir=str(plan.tdir), cwd=os.getcwd(),
                           search=plan.space.search, tracker_factory=tracker_factory,
                           parent_run_id=getattr(parent, "run_id", None), preflight=trials_need_preflight(plan.space))
        grid = _tuner(plan, ctx, verbose).fit()
    except BaseException:
        if parent is not None:
            parent.finish("FAILED")
        raise
    finally:
        if started:
            ray.shutdown()
    return parent, grid


def _tuner(plan: SearchPlan, ctx: TrialContext, verbose: int):
    # a new Tuner, or the one restored from plan.exp_dir
    from ray import tune

    trainable = trial_trainable(ctx, plan.trial_cfg)
    if plan.restoring:
        log.warning("resuming the tune search in %s", plan.exp_dir)
        return tune.Tuner.restore(str(plan.exp_dir), trainable=trainable, resume_unfinished=True)
    settings, trial_cfg = plan.space.search, plan.trial_cfg
    max_conc = settings["max_concurrent"] or max_concurrent_trials(
        trial_cfg, max(plan.space.n_values(trial_cfg.segments.n)))
    return tune.Tuner(
        trainable, param_space=plan.space.param_space(trial_cfg.segments.n),
        tune_config=tune.TuneConfig(
            search_alg=_search_alg(settings, plan.points, max_conc), scheduler=_scheduler(settings, trial_cfg),
            num_samples=plan.num_samples, trial_name_creator=lambda t: t.trial_id,
            trial_dirname_creator=lambda t: t.trial_id,
            reuse_actors=False),  # a trial's clean-up runs in its actor's stop(), which a reused actor skips
        run_config=tune.RunConfig(name="tune", storage_path=str(plan.tdir / "ray"), verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=0)))
