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

``ordered_cuts`` always gives valid, strictly increasing boundaries (see :mod:`o2mkd_ray.tune_space`); the
parsing and the sample -> Config translation live there and are re-exported here.

Each trial runs :func:`o2mkd_ray.driver.run_distillation` (its segments' TorchTrainers concurrently, inside
the trial) into ``OUT/tune/trials/<trial_id>``. While training, the trial reports ``quality`` = mean over
segments of the students' held-out KD loss (``val_loss``) each time every segment has reached a step, so ASHA
(``time_attr="step"``) can stop bad trials; the scheduler decides on ``val_loss`` (the same numbers), because
the final report replaces ``quality`` by the objective (teacher-agreement ε MSE, or trajectory-fidelity image
MSE), which is on another scale for ``fidelity``. ``cost`` = sampling MACs relative to the teacher, averaged
over the timesteps (each segment's student MACs weighted by its share of ``[0, T)``).

A trial runs its trainers without Train-level retries (``ray.max_failures = 0``) and, when the scheduler stops
it, aborts them before Tune frees the trial's resources (see ``_stop_trial_trainers``), so that no worker-group
placement group outlives a stopped trial.

Outputs: ``OUT/tune/results.csv`` (one row per trial), ``OUT/tune/pareto.png`` (quality vs cost, Pareto
front), ``OUT/tune/best.yaml`` (the best finished trial as a full, ready-to-run config).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from . import config as C
from .config import Config, ConfigError
from .tune_report import (  # noqa: F401 - re-exported: the public API of tuning
    _close_trial_runs,
    _ConfigDumper,
    _results_frame,
    _write_outputs,
    dump_config_yaml,
    pareto_front,
    plot_pareto,
)
from .tune_space import (  # noqa: F401 - re-exported: the public API of tuning
    CUTS_KEY,
    DISTRIBUTIONS,
    PER_SEGMENT_KEYS,
    SEARCH_DEFAULTS,
    Param,
    SearchSpace,
    _flatten,
    _INDEXED,
    _py,
    apply_budget,
    check_space,
    check_students,
    cuts_from_weights,
    load_space,
    parse_space,
    resolve_trial_config,
    sample_point,
    weights_from_boundaries,
)

log = logging.getLogger("o2mkd_ray")

TRIAL_CPU = 0.01  # a trial's own actor; 0 is rejected by Tune (RAY_NOTES)


# --------------------------------------------------------------------------------------------------------------
# cost and objective


def sampling_cost(cfg: Config, teacher, shape) -> dict:
    """Sampling MACs of the O2MKD students relative to the teacher, averaged over the timesteps.

    ``cost = Σ_k (b_{k+1} - b_k) · MACs(student_k) / (T · MACs(teacher))``: the expected per-step ratio when the
    sampler's timesteps spread evenly over ``[0, T)``. Students are built on the meta device (shapes only).

    Returns:
        ``cost``, ``macs`` (per student), ``teacher_macs``, ``params`` (per student).
    """
    import torch

    from .segments import Segments
    from .students import build_students, count_macs, count_params

    seg = Segments(cfg.segments.boundaries)
    scratch = copy.deepcopy(cfg)
    scratch.students.init = "scratch"
    with torch.device("meta"):
        students = build_students(scratch, teacher, seg.n)
    macs = [int(count_macs(s, (1, *shape))) for s in students]
    t_macs = int(count_macs(teacher, (1, *shape)))
    lengths = [seg.range(k)[1] - seg.range(k)[0] for k in range(seg.n)]
    cost = sum(n * m for n, m in zip(lengths, macs)) / (seg.num_train_timesteps * max(1, t_macs))
    return {"cost": float(cost), "macs": macs, "teacher_macs": t_macs, "params": [count_params(s) for s in students]}


def _refuse_text_to_image(cfg: Config, command: str) -> None:
    from .teacher import teacher_kind

    if teacher_kind(cfg.teacher) == "stable_diffusion":
        raise ConfigError(f"{command}: Stable Diffusion teachers are not supported by `o2mkd-ray {command}` yet (its "
                          "objectives read unconditional images); distil with `o2mkd-ray distill` and compare runs "
                          "with `o2mkd-ray eval`")


def objective_value(cfg: Config, out: str | Path, objective: str, teacher, scheduler, samples: int = 256,
                    images: int | None = None, steps: int | None = None) -> dict:
    """The final quality of a finished run folder (lower is better).

    Args:
        objective: ``agreement`` (student-vs-teacher ε MSE over t,
            :func:`~o2mkd_ray.evaluation.teacher_agreement`) or ``fidelity`` (image MSE teacher vs O2MKD from
            the same noise, DDIM, :func:`~o2mkd_ray.evaluation.trajectory_fidelity`).
    Returns:
        ``quality`` and the objective's own numbers.
    """
    from .data import build_dataset
    from .evaluation import teacher_agreement, trajectory_fidelity
    from .pipeline import O2MKDPipeline

    pipe = O2MKDPipeline.from_pretrained(Path(out) / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    multi = pipe.students.eval()
    if objective == "agreement":
        df = teacher_agreement(multi, lambda x_t, t: teacher(x_t, t), scheduler, build_dataset(cfg.data),
                               multi.segments, samples, 20, cfg.sampling.seed)
        v = float((df["mse"] * df["n"]).sum() / df["n"].sum())
        return {"quality": v, "agreement_mse": v}
    if objective == "fidelity":
        r = trajectory_fidelity(teacher, pipe, steps or cfg.eval.steps, images or cfg.eval.num_images,
                                cfg.sampling.seed, cfg.data.value_range, scheduler_config=scheduler.config)
        return {"quality": r["mse_mean"], "fidelity_mse": r["mse_mean"], "fidelity_psnr_db": r["psnr_mean_db"]}
    raise ConfigError(f"search.objective: must be agreement or fidelity, got {objective!r}")


# --------------------------------------------------------------------------------------------------------------
# resources


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


def trial_resources(cfg: Config):
    """A trial's placement group: ``{"CPU": 0.01}`` for the trial itself, then one bundle per teacher replica.

    Tune starts a trial's actor with ``placement_group_capture_child_tasks=True``, so actors it creates
    without their own placement group, such as the teacher service, are placed in the trial's group and need a
    bundle there. The Train controllers (0 CPU) fit anywhere; each TorchTrainer's workers get their own group.
    """
    from ray import tune

    bundles = [{"CPU": TRIAL_CPU}]
    if cfg.teacher.mode == "actor":
        t = {k: v for k, v in (("CPU", cfg.teacher.num_cpus), ("GPU", cfg.teacher.num_gpus)) if v > 0}
        bundles += [t] * cfg.teacher.replicas if t else []
    return tune.PlacementGroupFactory(bundles)


# --------------------------------------------------------------------------------------------------------------
# the trial


class _Progress:
    """Aggregates per-segment reports: once every segment has reached step s, one Tune report for s."""

    def __init__(self, n: int, total_steps: int, extra: dict, report: Callable[[dict], None]):
        self.n, self.total, self.extra, self.report = n, total_steps, extra, report
        self.by_step: dict[int, dict[int, dict]] = defaultdict(dict)
        self.last = 0

    def __call__(self, k: int, m: dict) -> None:
        s = int(m["step"])
        self.by_step[s][k] = m
        if len(self.by_step[s]) < self.n or s <= self.last:
            return
        ms = list(self.by_step.pop(s).values())
        self.last = s
        if s >= self.total:  # the final report (with the objective) stands for the last step
            return
        val = [x.get("val_loss") if x.get("val_loss") is not None else x.get("loss_avg") for x in ms]
        q = float(np.mean(val))
        self.report({"step": s, "quality": q, "val_loss": q, "loss_avg": float(np.mean([x["loss_avg"] for x in ms])),
                     "samples_per_s": float(sum(x.get("samples_per_s") or 0 for x in ms)), "final": False,
                     **self.extra})


# --- stopping a trial's trainers -------------------------------------------------------------------------------
# When the scheduler (ASHA) stops a trial, Tune calls the trainable's stop() and, once it returns, removes the
# trial's placement group, killing the trial actor and everything placed in it: the teacher actors, the progress
# queue and the segments' Train controllers (0 CPU, captured into the trial's group). A controller killed that way
# can leak its worker group's placement group (and its CPUs, for the rest of the search): one it was still waiting
# for, or one it created to retry a worker that had just died (Train's PlacementGroupCleaner only learns of a group
# once its workers are up). So a trial (1) runs its trainers with ``ray.max_failures = 0`` (no retry; start-up
# timeouts of queued segments are not failures and still retry) and (2) aborts its controllers in the
# trainable's cleanup(), which runs inside stop(), before Tune frees the group: ``TrainController.abort`` removes
# the worker group and its placement group; a controller whose group is still pending removes it when its start-up
# wait ends (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, lowered to 15 s in trials unless set) and then, seeing
# the stop request, gives up instead of trying again (RegisterController.before_controller_execute_resize_decision).

STOP_TIMEOUT_S = 30.0  # cleanup's wait for the aborted controllers, on top of the worker-group start-up timeout
TRIAL_START_TIMEOUT_S = "15"
_STOP_FILE = "stopped_trainers.json"  # written into the trial's folder by a cleanup that found live trainers
_ACTIVE: dict = {}  # in a trial's process: the running trial's registry actor, teacher names, folder, flags


class _ControllerRegistry:
    """Ray actor (0 CPU, one per trial): the trial's live Train controllers, ``actor_id -> handle``."""

    def __init__(self):
        self.handles: dict = {}
        self.stop_requested = False

    def request_stop(self) -> None:
        self.stop_requested = True

    def stopping(self) -> bool:
        return self.stop_requested

    def add(self, actor_id: str, handle) -> None:
        self.handles[actor_id] = handle

    def remove(self, actor_id: str) -> None:
        self.handles.pop(actor_id, None)  # a finished run: drop the handle so that the controller can exit

    def get(self) -> dict:
        return dict(self.handles)


@functools.cache
def _register_controller_cls():
    """A Train V2 ``ControllerCallback`` (defined lazily: Ray Train is heavy to import) that adds its controller
    to the trial's :class:`_ControllerRegistry` at start and removes it when the run finishes."""
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class RegisterController(ControllerCallback):
        def __init__(self, registry):
            self.registry = registry

        def after_controller_start(self, train_run_context) -> None:
            ctx = ray.get_runtime_context()
            try:
                ray.get(self.registry.add.remote(ctx.get_actor_id(), ctx.current_actor), timeout=30)
            except Exception as e:  # noqa: BLE001 - registration must never fail training
                log.warning("could not register the Train controller with the trial: %s", e)

        def before_controller_execute_resize_decision(self, resize_decision) -> None:
            # Runs in the control loop before each attempt to start the worker group. A controller whose group is
            # still waiting for CPUs never yields to an abort() call (that loop has no await), but its wait times
            # out, removing the pending group, and comes back here: a stopped trial ends the run instead.
            try:
                stop = ray.get(self.registry.stopping.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - registry gone: the trial is gone
                stop = True
            if stop:
                raise RuntimeError("the Tune trial was stopped: not starting the worker group")

        def after_controller_finish(self, result) -> None:
            try:
                ray.get(self.registry.remove.remote(ray.get_runtime_context().get_actor_id()), timeout=30)
            except Exception:  # noqa: BLE001
                pass

    return RegisterController


def _start_trial_registry(out: Path, teacher_names: list[str]) -> None:
    """In a trial: a controller registry, hooked into every segment trainer the trial starts."""
    import ray

    from . import driver

    registry = ray.remote(num_cpus=0)(_ControllerRegistry).remote()
    _ACTIVE.clear()
    _ACTIVE.update(registry=registry, teachers=teacher_names, out=out, stopping=False)
    driver.EXTRA_TRAIN_CALLBACKS[:] = [_register_controller_cls()(registry)]


def _stop_trial_trainers(timeout_s: float | None = None) -> dict:
    """Aborts the running trial's Train controllers and waits (bounded) until they are gone, then kills its
    teacher actors and the registry. Runs in the trial's process (the trainable's cleanup); returns counts."""
    import time

    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    from . import driver

    if not _ACTIVE:
        return {}
    _ACTIVE["stopping"] = True
    registry = _ACTIVE.get("registry")
    if timeout_s is None:
        timeout_s = STOP_TIMEOUT_S + float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
    deadline = time.monotonic() + timeout_s
    done: dict[str, str] = {}
    if registry is not None:
        try:
            ray.get(registry.request_stop.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001
            log.warning("trial cleanup: cannot reach the controller registry: %s", e)
    while registry is not None and time.monotonic() < deadline:
        try:
            live = ray.get(registry.get.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001
            log.warning("trial cleanup: cannot read the controller registry: %s", e)
            break
        new = {i: h for i, h in live.items() if i not in done}
        if not new:
            break
        refs = {i: h.abort.remote() for i, h in new.items()}
        for i, ref in refs.items():
            try:
                ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
                done[i] = "ended"  # the run had ended (finished, or gave up starting: see RegisterController)
            except RayActorError:
                done[i] = "aborted"  # the controller removed its worker group, then exited
            except GetTimeoutError:
                done[i] = "timeout"
                log.warning("trial cleanup: Train controller %s did not stop within %.0f s", i, timeout_s)
            except Exception as e:  # noqa: BLE001
                done[i] = "error"
                log.warning("trial cleanup: aborting Train controller %s failed: %s", i, e)
            if done[i] != "aborted":
                try:
                    ray.kill(new[i], no_restart=True)
                except Exception:  # noqa: BLE001
                    pass
    for name in _ACTIVE.get("teachers", []):
        try:
            ray.kill(ray.get_actor(name), no_restart=True)
        except Exception:  # noqa: BLE001 - not started or already gone
            pass
    if registry is not None:
        try:
            ray.kill(registry, no_restart=True)
        except Exception:  # noqa: BLE001
            pass
    driver.EXTRA_TRAIN_CALLBACKS.clear()
    counts = {s: list(done.values()).count(s) for s in ("aborted", "ended", "timeout", "error")}
    if done and _ACTIVE.get("out") is not None:
        try:
            Path(_ACTIVE["out"]).mkdir(parents=True, exist_ok=True)
            (Path(_ACTIVE["out"]) / _STOP_FILE).write_text(json.dumps(counts))
        except OSError:
            pass
    _ACTIVE.clear()
    return counts


class _StopTrainersOnCleanup:
    """Mixin for :func:`_trial`'s FunctionTrainable (``_trial.__mixins__``): stops the trial's trainers in
    ``cleanup()``, which Tune runs (via ``stop()``) before it removes the trial's placement group."""

    def cleanup(self):
        try:
            _stop_trial_trainers()
        except Exception as e:  # noqa: BLE001 - never keep Tune from stopping the trial
            log.warning("trial cleanup failed: %s", e)
        finally:
            super().cleanup()


def _default_tracker(tracking_uri: str | None, cfg: Config, parent_run_id: str | None):
    from .tracking import RunTracker

    return RunTracker(tracking_uri, parent_run_id=parent_run_id)


def _trial(config: dict, ctx: dict) -> None:
    """Tune function trainable: one whole O2MKD run (all its segments' TorchTrainers) for one sampled config."""
    from ray import tune

    from .driver import run_distillation, teacher_run_id
    from .teacher import load_teacher, sample_shape
    from .teacher_service import actor_names

    os.chdir(ctx["cwd"])  # Tune starts trials in their own folder; relative paths in the config mean the caller's
    trial_id = tune.get_context().get_trial_id()
    out = Path(ctx["trials_dir"]) / trial_id
    cfg = resolve_trial_config(ctx["base"], {**ctx["constants"], **config}, ctx["T"])
    cfg.name = f"{cfg.name}-{trial_id}"
    cfg.eval.enabled = False  # the trial computes its own objective; no FID/latency pass per trial
    cfg.mlflow.log_pipeline = False  # a pyfunc model per trial would be heavy; best.yaml is the product
    cfg.ray.max_failures = 0  # no Train retries in a trial: a retry racing a stop leaks a placement group
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", TRIAL_START_TIMEOUT_S)  # bounds cleanup's wait
    if cfg.ray.storage_path:  # trials must not share seg-KK trainer folders
        cfg.ray.storage_path = f"{cfg.ray.storage_path.rstrip('/')}/tune-trials/{trial_id}"
    teacher, scheduler = load_teacher(cfg.teacher)
    shape = sample_shape(teacher, cfg.data.channels, cfg.data.resolution)
    cost = sampling_cost(cfg, teacher, shape)
    tracker = None
    if ctx["tracker_factory"] is not None:
        tracker = ctx["tracker_factory"](cfg, ctx["parent_run_id"])
        tracker.start(cfg, out, tags={"o2mkd.kind": "tune-trial", "o2mkd.trial_id": trial_id,
                                      "o2mkd.tune_out": ctx["tune_dir"]})
    extra = {"cost": cost["cost"], "n": cfg.segments.n, "mlflow_run_id": getattr(tracker, "run_id", None) or ""}
    progress = _Progress(cfg.segments.n, cfg.train.steps, extra, tune.report)
    s = ctx["search"]
    teachers = actor_names(teacher_run_id(out), cfg.teacher.replicas) if cfg.teacher.mode == "actor" else []
    _start_trial_registry(out, teachers)
    try:
        report = run_distillation(cfg, out, progress=False, on_progress=progress, tracker=tracker)
        obj = objective_value(cfg, out, s["objective"], teacher, scheduler, s["eval_samples"], s["eval_images"],
                              s["eval_steps"])
    except BaseException:
        stopping = _ACTIVE.get("stopping", True)  # cleared by the cleanup: stopped by Tune too
        if tracker is not None:
            tracker.finish("KILLED" if stopping else "FAILED")
        if stopping:
            return  # stopped by the scheduler: the trainers were aborted on purpose
        raise
    lengths = np.diff(report["boundaries"])
    real_cost = float(sum(n * seg["macs"] for n, seg in zip(lengths, report["segments"]))
                      / (report["boundaries"][-1] * max(1, report["teacher"]["macs"])))
    vals = [x.get("val_loss") for x in report["segments"] if x.get("val_loss") is not None]
    final = {**extra, **obj, "step": cfg.train.steps, "cost": real_cost, "objective": s["objective"],
             "val_loss": float(np.mean(vals)) if vals else float("nan"), "final": True,
             "run_wall_s": float(report.get("wall_s", 0.0))}
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in final.items() if isinstance(v, (int, float)) and k != "final"})
        tracker.finish("FINISHED")
    tune.report(final)


_trial.__mixins__ = (_StopTrainersOnCleanup,)  # wrap_function builds the trial's FunctionTrainable with it


# --------------------------------------------------------------------------------------------------------------
# run_tuning


def _search_alg(settings: dict, points: list[dict], max_conc: int):
    alg, seed = settings["algorithm"], settings["seed"]
    if alg in ("random", "grid"):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # max_concurrent_trials is ignored with an own BasicVariantGenerator: give it max_concurrent
        # (RAY_NOTES)
        return BasicVariantGenerator(points_to_evaluate=points or None, max_concurrent=max_conc, random_state=seed)
    from ray.tune.search import ConcurrencyLimiter

    if importlib.util.find_spec(alg) is None:
        raise ConfigError(f"search.algorithm={alg} needs `pip install {alg}`")
    if alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        s = OptunaSearch(metric="quality", mode="min", points_to_evaluate=points or None, seed=seed)
    else:
        from ray.tune.search.hyperopt import HyperOptSearch

        s = HyperOptSearch(metric="quality", mode="min", points_to_evaluate=points or None, random_state_seed=seed)
    return ConcurrencyLimiter(s, max_concurrent=max_conc)


def _scheduler(settings: dict, trial_cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    steps = trial_cfg.train.steps
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

    flat = {k: v for k, v in _flatten(base).items()}
    out = dict(point)
    for k, dom in param_space.items():
        if k in out:
            continue
        m = _INDEXED.match(k)
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




def seed_points(space: SearchSpace, cfg: Config, trial_base: dict, T: int, stats=None) -> list[dict]:
    """``points_to_evaluate``: for every n of the space, the boundaries proposed from the teacher's features
    (:func:`o2mkd_ray.analysis.propose_boundaries`), then the uniform ones (duplicates dropped)."""
    from .analysis import feature_stats, propose_boundaries
    from .segments import Segments

    if space.cuts is None:
        raise ConfigError(f"--seed-from-analysis needs `{CUTS_KEY}: {{ordered_cuts: ...}}` in the space")
    base_n = C.from_dict(trial_base).segments.n
    ns = space.n_values(base_n)
    max_n = max(ns)
    stats = feature_stats(cfg) if stats is None else stats
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
            trials); default :class:`o2mkd_ray.tracking.RunTracker` when ``cfg.mlflow.enabled``.
        verbose: Tune's console verbosity (0 silent).
    Returns:
        The results table (also ``out/tune/results.csv``): one row per trial with ``trial_id, status, n,
        boundaries, widths, quality, cost, val_loss, steps, pareto, best``, the other tuned keys, ``out``.
    Raises:
        ConfigError: bad space/config/output folder (before any Ray work), a missing optuna/hyperopt, or no
            finished trial within ``max_cost`` (results.csv and pareto.png are written first).
    """
    from ray import tune

    from .data import check_data
    from .driver import _init_ray, _run_hash
    from .teacher import check_teacher, load_teacher, sample_shape

    sp = load_space(space)
    out = Path(out).expanduser().resolve()
    tdir = out / "tune"
    exp_dir = tdir / "ray" / "tune"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder")
    restoring = exp_dir.is_dir() and tune.Tuner.can_restore(exp_dir)
    if restoring and not resume:
        raise ConfigError(f"--out {str(out)!r} already holds a tune search ({exp_dir}); drop --no-resume to "
                          "continue it, or use a new --out")
    check_teacher(cfg.teacher, cfg.data)
    _refuse_text_to_image(cfg, "tune")
    check_data(cfg.data)
    teacher, scheduler = load_teacher(cfg.teacher)
    T = int(scheduler.config.num_train_timesteps)
    shape = sample_shape(teacher, cfg.data.channels, cfg.data.resolution)
    base = cfg.to_dict()
    trial_base = apply_budget(base, sp.budget)
    check_space(sp, trial_base, T)
    check_space(sp, base, T)
    check_students(sp, teacher, trial_base)
    settings = sp.search
    num_samples = num_samples or settings["num_samples"]
    ident = {"run": _run_hash(base), "space": sp.raw}  # what makes it the same search (not placement/tracking)
    ident_file = tdir / "tune.json"
    if ident_file.is_file() and json.loads(ident_file.read_text()).get("ident") != json.loads(json.dumps(ident)):
        raise ConfigError(f"--out {str(out)!r} holds a tune search with another config or space; use a new --out")
    if settings["algorithm"] in ("optuna", "hyperopt") and importlib.util.find_spec(settings["algorithm"]) is None:
        raise ConfigError(f"search.algorithm={settings['algorithm']} needs `pip install {settings['algorithm']}`")
    base_n = C.from_dict(trial_base).segments.n
    max_n = max(sp.n_values(base_n))
    points = seed_points(sp, cfg, trial_base, T) if seed_from_analysis and not restoring else []
    points = points[:num_samples]  # Tune would run every point even beyond num_samples
    tdir.mkdir(parents=True, exist_ok=True)
    ident_file.write_text(json.dumps({"ident": ident, "num_samples": num_samples, "points_to_evaluate": points},
                                     indent=2, default=_py))

    factory = tracker_factory
    if factory is None and cfg.mlflow.enabled:
        from .tracking import resolve_tracking_uri

        factory = functools.partial(_default_tracker, resolve_tracking_uri(cfg, out))
    parent, started = None, False
    try:
        started, _ = _init_ray(cfg)
        if factory is not None:
            parent = factory(cfg, None)
            parent.start(cfg, tdir, tags={"o2mkd.kind": "tune", "o2mkd.space": sp.source,
                                          "o2mkd.objective": settings["objective"]})
        max_conc = settings["max_concurrent"] or max_concurrent_trials(C.from_dict(trial_base), max_n)
        ctx = {"base": trial_base, "constants": sp.constants(), "T": T, "trials_dir": str(tdir / "trials"),
               "tune_dir": str(tdir), "cwd": os.getcwd(), "search": settings, "tracker_factory": factory,
               "parent_run_id": getattr(parent, "run_id", None)}
        trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx),
                                        trial_resources(C.from_dict(trial_base)))
        if restoring:
            log.warning("resuming the tune search in %s", exp_dir)
            tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space=sp.param_space(base_n),
                tune_config=tune.TuneConfig(
                    search_alg=_search_alg(settings, points, max_conc),
                    scheduler=_scheduler(settings, C.from_dict(trial_base)), num_samples=num_samples,
                    trial_name_creator=lambda t: t.trial_id, trial_dirname_creator=lambda t: t.trial_id),
                run_config=tune.RunConfig(name="tune", storage_path=str(tdir / "ray"), verbose=verbose,
                                          failure_config=tune.FailureConfig(max_failures=0)))
        grid = tuner.fit()
    except BaseException:
        if parent is not None:
            parent.finish("FAILED")
        raise
    finally:
        if started:
            import ray

            ray.shutdown()
    df = _results_frame(grid, sp, trial_base, T, teacher, shape, tdir)
    try:
        best = _write_outputs(df, sp, base, T, tdir, max_cost, cfg.name)
    finally:
        if parent is not None:
            _close_trial_runs(parent, df)
            files = [tdir / f for f in ("results.csv", "pareto.png", "best.yaml") if (tdir / f).is_file()]
            parent.log_artifacts(files)
            fin = df[df["status"] == "TERMINATED"]
            parent.log_metrics({"num_trials": len(df), "num_finished": len(fin),
                                **({"best_quality": float(fin["quality"].min())} if len(fin) else {})})
            parent.finish("FINISHED")
    log.warning("tune: %d trials, best %s", len(df), best)
    return df


# --------------------------------------------------------------------------------------------------------------
# CLI hooks (wired into o2mkd_ray.cli)


def add_tune_parser(subparsers):
    """Adds ``tune CONFIG SPACE [--num-samples K] [--out DIR] [--set ...] [--max-cost C] [--seed-from-analysis]
    [--no-resume]`` to an argparse subparsers object; returns the parser."""
    p = subparsers.add_parser("tune", help="Ray Tune over boundaries/widths/KD weights; one trial = one whole "
                                           "O2MKD run (writes OUT/tune/results.csv, pareto.png, best.yaml)")
    p.add_argument("config", help="pipelines/*.yaml (the full budget; the space's budget: reduces trials)")
    p.add_argument("space", help="tune_spaces/*.yaml")
    p.add_argument("--num-samples", type=int, default=None, help="trials (default search.num_samples)")
    p.add_argument("--out", default=None, help="output folder (default runs/<name>-tune)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-cost", type=float, default=None,
                   help="best.yaml: the best trial with cost (MACs per step / teacher) at most this")
    p.add_argument("--seed-from-analysis", action="store_true",
                   help="first trials: boundaries proposed from the teacher's features, and uniform ones")
    p.add_argument("--no-resume", action="store_true", help="refuse an --out that already holds a search")
    return p


def run_tune_cli(args) -> int:
    """Runs :func:`run_tuning` for parsed ``tune`` arguments; prints a JSON summary."""
    cfg = C.load(args.config, args.overrides)
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {args.num_samples}")
    out = Path(args.out or f"runs/{cfg.name}-tune")
    df = run_tuning(cfg, args.space, out, num_samples=args.num_samples, max_cost=args.max_cost,
                    seed_from_analysis=args.seed_from_analysis, resume=not args.no_resume, verbose=1)
    best = df[df["best"]].iloc[0]
    tdir = out.expanduser().resolve() / "tune"
    print(json.dumps({
        "trials": df["status"].value_counts().to_dict(),
        "best": {"trial_id": best["trial_id"], "quality": float(best["quality"]), "cost": float(best["cost"]),
                 "boundaries": json.loads(best["boundaries"]), "widths": json.loads(best["widths"])},
        "pareto": df[df["pareto"]][["trial_id", "quality", "cost"]].to_dict("records"),
        "files": [str(tdir / f) for f in ("results.csv", "pareto.png", "best.yaml")],
    }, indent=2, default=_py))
    return 0
