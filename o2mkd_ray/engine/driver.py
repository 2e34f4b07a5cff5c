"""``run_distillation(cfg, out)``: Ray up, the shared teacher service, one TorchTrainer per segment (all in flight
at once), then the diffusers pipeline, ``samples.png`` and ``report.json``.

Its steps, each a function here or in :mod:`o2mkd_ray.engine.trainers`: prepare the run folder, start Ray, start the
teacher service, build the per-segment loop configs, fit the trainers concurrently (each saves its segment), shut
down, assemble. ``o2mkd_ray.engine.session.run_local`` is the same job without Ray.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from o2mkd_ray.config.schema import Config
from o2mkd_ray.distill.run_folder import finished_summary, is_conditional, load_cond_data, prepare_run
from o2mkd_ray.engine.console import ConsoleProgress, checkpoints_only
from o2mkd_ray.engine.faults import teacher_fault, watch_driver
from o2mkd_ray.engine.phases import PhaseTimer
from o2mkd_ray.engine.ray_compat import check_ray_version, session_logs_dir
from o2mkd_ray.engine.run_folder import finish_run
from o2mkd_ray.engine.session import tracked_session
from o2mkd_ray.engine.storage import check_storage, display_storage, run_storage, storage_env
from o2mkd_ray.engine.trainers import (
    ProgressRelay,
    fit_all,
    fit_segment,
    loop_configs,
    student_inits,
)
from o2mkd_ray.errors import ConfigError

log = logging.getLogger(__name__)

# Ray Train V2 polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and every ray.train.report
# waits for that poll: a faster poll keeps reports from stalling training.
RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DEDUP_LOGS": "1",
    # segments train with fractional CPUs, so a local Ray runs more worker processes than cores by design: the
    # raylet's "N worker processes have been started ... maximum expected startup concurrency" warning is expected
    "RAY_worker_maximum_startup_concurrency": "64",
}


def ray_env(cfg: Config) -> dict[str, str]:
    """The environment of a local Ray's processes: ``RAY_ENV`` and the Train poll interval
    (``ray.health_check_interval_s``)."""
    return {**RAY_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(cfg.ray.health_check_interval_s)}


def init_ray(cfg: Config, verbose: bool = True) -> tuple[bool, str]:
    """Connects to ``ray.address`` / ``RAY_ADDRESS``, or starts a local Ray (unless one is already up).

    The job's processes get the storage client variables set here (:func:`o2mkd_ray.engine.storage.storage_env`:
    ``AWS_*`` credentials and endpoint), so that workers on any node can open an ``s3://`` ``ray.storage_path``.
    Ray's Python logging goes to the process's logging handlers (the CLI sends it to the run's log file);
    ``verbose`` False keeps the workers' and raylet's output in Ray's session logs instead of the driver's console.

    Returns:
        ``(started, gcs_address)``: ``started`` is True when this call started or connected Ray (the caller shuts
        it down).
    Raises:
        ConfigError: the address is unreachable.
    """
    import ray

    if ray.is_initialized():
        return False, ray.get_runtime_context().gcs_address
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    check_ray_version()
    quiet = dict(configure_logging=False, logging_level=logging.INFO, log_to_driver=verbose)
    if address:
        from o2mkd_ray.engine.ray_compat import check_ray_address

        # ray.init on a dead address retries for minutes (measured: >5 min for 127.0.0.1:1): one TCP connect first
        check_ray_address(address, "ray.address" if cfg.ray.address else "RAY_ADDRESS")
        try:
            # an existing cluster: no num_cpus (it would be rejected); its nodes' own environments lack the driver's
            # storage credentials, so the job carries them
            ray.init(address=address, runtime_env={"env_vars": storage_env()}, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"ray.address: cannot connect to Ray at {address!r} ({str(e).splitlines()[0]}); "
                              "start it with `ray start --head` or unset ray.address/RAY_ADDRESS") from None
    else:
        env = ray_env(cfg)
        os.environ.update(env)  # inherited by the local raylet's workers and the Train controller
        tmp = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="o2mkd-ray-")
        # the dashboard serves Ray's State API (Train's cleaners poll it) and `ray job`; bound to 127.0.0.1
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=True,
                 dashboard_host=cfg.ray.dashboard_host, _temp_dir=tmp,
                 runtime_env={"env_vars": {**env, **storage_env()}}, **quiet)
    return True, ray.get_runtime_context().gcs_address


def run_distillation(cfg: Config, out: str | Path, progress: bool = True,
                     on_progress: Callable[[int, dict], None] | None = None, tracker=None,
                     parent_run_id: str | None = None, train_callbacks: list | None = None,
                     checked: bool = False, verbose: bool = True) -> dict:
    """Distils the teacher into ``segments.n`` students, one Ray TorchTrainer per segment, all concurrently;
    tracks the run in MLflow (parent run + one child per segment) and runs the quick evaluation.

    Args:
        cfg: validated config.
        out: run folder (created; an existing folder with the same config resumes).
        progress: print one line per segment report.
        on_progress: called in the driver as ``on_progress(segment, metrics)`` for every report of every
            segment while training runs (Tune trials use it to report intermediate results).
        tracker: an already started :class:`o2mkd_ray.tracking.tracker.RunTracker`; None makes one when
            ``mlflow.enabled`` (nested under ``parent_run_id`` if given).
        train_callbacks: Ray Train run callbacks given to every segment's ``RunConfig`` (a Tune trial registers
            its trainers' controllers this way, to abort them when the trial is stopped).
        checked: the caller already ran :func:`o2mkd_ray.engine.session.preflight` on ``cfg`` and ``out``.
        verbose: the workers' and raylet's own output on the driver's console (else only in Ray's logs).
    Returns:
        The report dict (also written to ``OUT/report.json``).
    Raises:
        ConfigError: (unless ``checked``) a remote ``ray.storage_path`` that cannot be used, before Ray starts.
    """
    if not checked:
        check_storage(cfg.ray.storage_path)
    return tracked_session(cfg, out, "ray", tracker, parent_run_id,
                           lambda tr: _run_ray(cfg, out, progress, on_progress, tr, train_callbacks, verbose),
                           checked)


def teacher_run_id(out: str | Path) -> str:
    """The id in the run's teacher actor names (``teacher_service.actor_names``): stable per resolved --out."""
    return hashlib.sha1(str(Path(out).expanduser().resolve()).encode()).hexdigest()[:8]


@dataclass
class TeacherService:
    """The segments' teacher as the driver started it: actors (``teacher.mode: actor``, else none), their names,
    and the channels of the teacher blocks used for feature KD."""

    handles: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    channels: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)  # actor name -> the node id it started on


def _start_teacher_service(cfg: Config, out: Path, teacher, shape, todo: list[int]) -> TeacherService:
    """The teacher actors, when segments are left to train and ``teacher.mode`` is ``actor``."""
    import ray

    from o2mkd_ray.core.teacher import TeacherFn
    from o2mkd_ray.engine.placement import replica_nodes
    from o2mkd_ray.engine.teacher_service import actor_names, start_teacher

    fn = TeacherFn(teacher, cfg.kd.feature_blocks)
    service = TeacherService(channels=fn.feature_channels(shape) if cfg.kd.lambda_feat > 0 else {})
    if todo and cfg.teacher.mode == "actor":
        run_id = teacher_run_id(out)
        nodes = replica_nodes(cfg.teacher)  # per_node: one per node that can train; else spread by Ray
        service.names = actor_names(run_id, len(nodes))
        service.handles = start_teacher(cfg.teacher, run_id, list(service.channels) or None,
                                        teacher_fault(cfg.debug, out), nodes)
        ready = ray.get([h.ready.remote() for h in service.handles])
        service.nodes = {name: r["node_id"] for name, r in zip(service.names, ready)}
    return service


def _share_cond_data(cfg: Config, out: Path, teacher, scheduler, service: TeacherService):
    """Conditional runs: the latents + conditions (caption embeddings, DiT's class labels; synthesised by the
    teacher actors if needed), once, in the object store for every segment's workers."""
    import ray

    from o2mkd_ray.engine.teacher_service import TeacherClient

    client = TeacherClient(service.names, client="synth") if service.names else None
    cond = load_cond_data(cfg, out, teacher, scheduler, client)
    return ray.put({k: v for k, v in cond.items() if k != "prompts"})


def _shutdown(service: TeacherService, started_ray: bool) -> None:
    import ray

    from o2mkd_ray.engine.teacher_service import stop_teacher

    stop_teacher(service.handles)
    if started_ray:
        ray.shutdown()


def _run_ray(cfg: Config, out, progress, on_progress, tracker, train_callbacks=None, verbose: bool = True) -> dict:
    """The Ray part of :func:`run_distillation`: Ray, the teacher service, N concurrent TorchTrainers, assembly.

    Returns:
        The report (:func:`o2mkd_ray.engine.run_folder.finish_run`) with the engine, Ray address and phase times.
    """
    from o2mkd_ray.engine.bottleneck import teacher_load
    from o2mkd_ray.engine.teacher_service import teacher_stats

    t_start, timer = time.time(), PhaseTimer()
    with timer.phase("load_s"):
        out, teacher, scheduler, shape, segments = prepare_run(cfg, out, tracker.set_boundaries if tracker else None)
    with timer.phase("ray_init_s"):
        started_ray, address = init_ray(cfg, verbose)
        if tracker is not None:
            tracker.log_dict({"ray_address": address}, "ray.json")
    storage, service = run_storage(cfg, out), TeacherService()
    try:
        with timer.phase("teacher_service_s"):
            todo = [k for k in range(segments.n) if finished_summary(out, k) is None]
            service = _start_teacher_service(cfg, out, teacher, shape, todo)
            cond_ref = _share_cond_data(cfg, out, teacher, scheduler, service) if todo and is_conditional(cfg) \
                else None
            inits = student_inits(cfg, teacher, segments.n) if todo else []
            configs = loop_configs(cfg, segments, scheduler, todo, inits, service.names, service.channels, cond_ref,
                                   service.nodes)
        watch_driver(cfg.debug, storage)
        with timer.phase("train_s"):
            if progress:
                print(describe_plan(cfg, segments, todo, service.names, storage), flush=True)
                print(f"  Ray logs: {session_logs_dir() or 'see ray.init output'} (--verbose shows them here)",
                      flush=True)
            console = ConsoleProgress(cfg.train.steps) if progress else None
            listeners = [checkpoints_only(on_progress), tracker.on_progress if tracker else None, console]
            t_fit = time.time()
            try:
                summaries = fit_all(configs, lambda k, c: fit_segment(cfg, k, c, storage, out, segments,
                                                                      train_callbacks),
                                    ProgressRelay([f for f in listeners if f]))
            finally:
                if console is not None:
                    console.close()
        stats = teacher_stats(service.handles, cfg, service.names,
                              train_wall_s=training_window(summaries) or time.time() - t_fit)
    finally:
        with timer.phase("ray_shutdown_s"):
            _shutdown(service, started_ray)
    report = finish_run(cfg, out, teacher, scheduler, segments, shape, stats, t_start,
                        extra={"engine": "ray", "ray_address": address, "phases": timer.phases,
                               "worker_startup_s": worker_startup(summaries),
                               "bottleneck": teacher_load(stats, summaries)})
    _tell_bottleneck(report, tracker, progress)
    return report


def worker_startup(summaries: dict[int, dict]) -> dict[str, float]:
    """Per segment trained in this run, the seconds from its ``TorchTrainer.fit()`` call to the start of its
    training loop: Ray Train's controller, the worker group's processes and their imports, the process group and
    the loop's data and model set-up. It is the Ray engine's main fixed cost (inside the ``train_s`` phase). The
    two ends are read on two clocks (the driver's, rank 0's node's): on a cluster, clock skew adds to it."""
    return {f"seg-{k:02d}": round(s["loop_started_at"] - s["fit_started_at"], 3) for k, s in sorted(summaries.items())
            if s.get("loop_started_at") and s.get("fit_started_at")}


def training_window(summaries: dict[int, dict]) -> float | None:
    """Seconds from the first training loop's start to the last one's end over the segments trained in this run
    (the teacher's utilisation is over this: worker start-up and teardown would dilute it), or None."""
    starts = [s.get("loop_started_at") or s.get("started_at") for s in summaries.values()]
    ends = [s.get("finished_at") for s in summaries.values()]
    if not summaries or None in starts or None in ends:
        return None
    return max(ends) - min(starts)


def _tell_bottleneck(report: dict, tracker, progress: bool) -> None:
    """The run's last word on the teacher: its utilisation and the students' wait share to MLflow, and the advice
    line (:mod:`o2mkd_ray.engine.bottleneck`) on the console and in the log when the teacher held training back."""
    from o2mkd_ray.engine.bottleneck import tracker_metrics

    if tracker is not None:
        tracker.log_metrics(tracker_metrics(report))
    b = report.get("bottleneck") or {}
    if b.get("advice"):
        log.warning("%s", b["advice"])
        if progress:
            print(b["advice"], flush=True)
    elif b and progress:
        print(f"teacher utilisation {b['teacher_utilisation']:.2f}, students waited {b['teacher_wait_share']:.0%} "
              "of each step: the teacher kept up", flush=True)


def describe_plan(cfg: Config, segments, todo: list[int], teacher_names: list[str], storage: str) -> str:
    """What runs where: one line per segment (its timesteps, workers and resources), the teacher, the storage."""
    r = cfg.ray
    lines = []
    for k in range(segments.n):
        lo, hi = segments.range(k)
        if k not in todo:
            lines.append(f"  seg-{k:02d}  t in [{lo}, {hi})  finished earlier: kept")
            continue
        ov = r.segment_overrides.get(str(k))
        workers = (ov.num_workers if ov and ov.num_workers else None) or r.workers_per_segment
        cpus = ov.cpus_per_worker if ov and ov.cpus_per_worker is not None else r.cpus_per_worker
        gpus = ov.gpus_per_worker if ov and ov.gpus_per_worker is not None else r.gpus_per_worker
        res = f"{cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
        lines.append(f"  seg-{k:02d}  t in [{lo}, {hi})  TorchTrainer seg-{k:02d}: {workers} worker(s) x {res}"
                     + (f", {r.placement}" if workers > 1 else ""))
    t = cfg.teacher
    teacher = (f"{len(teacher_names)} shared actor(s)" + (" (one per node)" if t.replicas == "per_node" else "")
               + f" x {t.num_cpus:g} CPU" + (f" + {t.num_gpus:g} GPU" if t.num_gpus
               else "") if teacher_names else "a copy in each worker (teacher.mode: local)")
    steps = cfg.train.steps
    budget = f"{steps} steps each" if not isinstance(steps, list) else f"steps per segment {steps}"
    return "\n".join([f"training {len(todo)} of {segments.n} segments concurrently, {budget}:",
                      *lines, f"  teacher: {teacher}", f"  checkpoints: {display_storage(storage)}"])
