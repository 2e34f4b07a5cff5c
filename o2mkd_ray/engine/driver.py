"""``run_distillation(cfg, out)``: Ray up, the shared teacher service, one TorchTrainer per segment (all in flight
at once), then the diffusers pipeline, ``samples.png`` and ``report.json``.

``run_local`` is the same job as a plain single-process loop over the segments (no Ray): a baseline for the
orchestration benchmark and a fallback for debugging.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from o2mkd_ray.config.schema import Config
from o2mkd_ray.distill.run_folder import (
    finished_summary,
    is_text_to_image,
    load_cond_data,
    prepare_run,
    save_segment,
)
from o2mkd_ray.engine.run_folder import finish_run
from o2mkd_ray.engine.session import tracked_session
from o2mkd_ray.errors import ConfigError

log = logging.getLogger(__name__)


# Ray Train V2 polls workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default) and every ray.train.report
# waits for that poll: a faster poll keeps reports from stalling training.
RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DEDUP_LOGS": "1",
}


def ray_env(cfg: Config) -> dict[str, str]:
    """The environment of a local Ray's processes: ``RAY_ENV`` and the Train poll interval
    (``ray.health_check_interval_s``)."""
    return {**RAY_ENV, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(cfg.ray.health_check_interval_s)}


def init_ray(cfg: Config):
    import ray

    if ray.is_initialized():
        return False, ray.get_runtime_context().gcs_address
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    quiet = dict(configure_logging=True, logging_level=logging.WARNING)
    if address:
        from o2mkd_ray.engine.ray_compat import check_ray_address

        # ray.init on a dead address retries for minutes (measured: >5 min for 127.0.0.1:1): one TCP connect first
        check_ray_address(address, "ray.address" if cfg.ray.address else "RAY_ADDRESS")
        try:
            ray.init(address=address, **quiet)  # an existing cluster: bare init (num_cpus would be rejected)
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
                 runtime_env={"env_vars": env}, **quiet)
    return True, ray.get_runtime_context().gcs_address


def _student_init(cfg: Config, teacher, n: int) -> list[dict]:
    from o2mkd_ray.core.students import build_students

    out = []
    for s in build_students(cfg, teacher, n):
        out.append({"class": type(s).__name__,
                    "config": {k: v for k, v in dict(s.config).items() if not k.startswith("_")},
                    "state": {k: v.detach().cpu().numpy() for k, v in s.state_dict().items()}})
    return out




def _trainer(cfg: Config, k: int, loop_config: dict, storage: str, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from o2mkd_ray.engine.train_loop import train_loop_per_worker

    r = cfg.ray
    ov = r.segment_overrides.get(str(k))
    workers = (ov.num_workers if ov and ov.num_workers else None) or r.workers_per_segment
    cpus = ov.cpus_per_worker if ov and ov.cpus_per_worker is not None else r.cpus_per_worker
    gpus = ov.gpus_per_worker if ov and ov.gpus_per_worker is not None else r.gpus_per_worker
    resources = {"CPU": cpus} if cpus else {}
    if gpus:
        resources["GPU"] = gpus
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"seg-{k:02d}",  # stable: the same RunConfig(name, storage_path) resumes in place
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep, checkpoint_score_attribute="step",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=r.max_failures),
            callbacks=list(callbacks or []) or None,
        ),
    )


def _pick_checkpoint(cfg: Config, result):
    if cfg.train.select == "best" and result.best_checkpoints:
        ckpt, metrics = min(result.best_checkpoints, key=lambda cm: cm[1].get("val_loss", float("inf")))
        return ckpt, metrics
    return result.checkpoint, (result.metrics or {})


def _driver_fault_watch(cfg: Config, storage: Path) -> None:
    # test-only fault injection (debug.kill_driver_after_checkpoints: N): the driver dies once N checkpoints exist
    n = cfg.debug.get("kill_driver_after_checkpoints")
    marker = cfg.debug.get("marker")
    if not n or (marker and os.path.exists(marker)):
        return

    def watch():
        while True:
            if len(list(storage.glob("seg-*/checkpoint_*"))) >= n:
                if marker:
                    Path(marker).write_text("driver killed")
                log.warning("debug.kill_driver_after_checkpoints: killing the driver")
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def run_distillation(cfg: Config, out: str | Path, progress: bool = True,
                     on_progress: Callable[[int, dict], None] | None = None, tracker=None,
                     parent_run_id: str | None = None, train_callbacks: list | None = None,
                     checked: bool = False) -> dict:
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
    Returns:
        The report dict (also written to ``OUT/report.json``).
    """
    return tracked_session(cfg, out, "ray", tracker, parent_run_id,
                           lambda tr: _run_ray(cfg, out, progress, on_progress, tr, train_callbacks), checked)


def teacher_run_id(out: str | Path) -> str:
    """The id in the run's teacher actor names (``teacher_service.actor_names``): stable per resolved --out."""
    return hashlib.sha1(str(Path(out).expanduser().resolve()).encode()).hexdigest()[:8]


def _run_ray(cfg: Config, out, progress, on_progress, tracker, train_callbacks=None) -> dict:
    """The Ray part of :func:`run_distillation`: teacher actors, N concurrent TorchTrainers, assembly."""
    import ray
    from ray.util.queue import Empty, Queue

    from o2mkd_ray.core.teacher import TeacherFn
    from o2mkd_ray.engine.teacher_service import actor_names, start_teacher

    t_start = time.time()
    out, teacher, scheduler, shape, segments = prepare_run(cfg, out, tracker.set_boundaries if tracker is not None else None)
    phases = {"load_s": time.time() - t_start}
    started_ray, address = init_ray(cfg)
    if tracker is not None:
        tracker.log_dict({"ray_address": address}, "ray.json")
    phases["ray_init_s"] = time.time() - t_start - sum(phases.values())
    storage = cfg.ray.storage_path or str(out / "ray")
    run_id = teacher_run_id(out)
    handles = []
    try:
        todo = [k for k in range(segments.n) if finished_summary(out, k) is None]
        local_fn = TeacherFn(teacher, cfg.kd.feature_blocks)
        teacher_channels = local_fn.feature_channels(shape) if cfg.kd.lambda_feat > 0 else {}
        names = []
        cond_ref = None
        if todo and cfg.teacher.mode == "actor":
            fault = None
            if cfg.debug.get("kill_teacher_after_requests"):
                fault = {"kill_teacher_after_requests": cfg.debug["kill_teacher_after_requests"],
                         "marker": cfg.debug.get("marker", str(out / ".teacher_killed"))}
            handles = start_teacher(cfg.teacher, run_id, list(teacher_channels) or None, fault)
            names = actor_names(run_id, cfg.teacher.replicas)
        if todo and is_text_to_image(cfg):  # latents + text embeddings, once, shared by segments
            from o2mkd_ray.engine.teacher_service import TeacherClient

            cond = load_cond_data(cfg, out, teacher, scheduler, TeacherClient(names, client="synth") if names else None)
            cond_ref = ray.put({k: v for k, v in cond.items() if k != "prompts"})
        inits = _student_init(cfg, teacher, segments.n)
        phases["teacher_service_s"] = time.time() - t_start - sum(phases.values())
        if not storage.startswith(("s3://", "gs://", "abfs://", "hdfs://")):
            _driver_fault_watch(cfg, Path(storage))
        results: dict[int, dict] = {}
        errors: dict[int, BaseException] = {}
        queue = Queue(actor_options={"num_cpus": 0})
        listeners = [f for f in (on_progress, tracker.on_progress if tracker else None,
                                 _print_progress(cfg) if progress else None) if f]

        def fit(k: int):
            loop_config = {
                "cfg": cfg.to_dict(), "segment": k, "boundaries": list(segments.boundaries),
                "scheduler_config": dict(scheduler.config), "teacher_names": names,
                "teacher_channels": teacher_channels, "feature_blocks": list(teacher_channels) or None,
                "student_init": [ray.put(inits[k])],  # wrapped in a list: passed as a reference, fetched in the worker
                "cond_data": [cond_ref] if cond_ref is not None else None,
                "progress": [queue],  # plumbing, not config: never logged
            }
            t0 = time.time()
            result = _trainer(cfg, k, loop_config, storage, train_callbacks).fit()
            if result.error:
                raise result.error
            ckpt, metrics = _pick_checkpoint(cfg, result)
            rv = getattr(result, "return_value", None) or {}
            summary = {
                "index": k, "boundaries": list(segments.range(k)),
                "started_at": rv.get("started_at", t0), "finished_at": rv.get("finished_at", time.time()),
                "steps": int(metrics.get("step", rv.get("steps", 0))), "resumed_from": rv.get("resumed_from", 0),
                "final_loss": metrics.get("loss_avg"), "val_loss": metrics.get("val_loss"),
                "samples_per_s": metrics.get("samples_per_s"), "checkpoint": ckpt.path if ckpt else None,
                "history": rv.get("history", []), "fit_started_at": t0, "fit_finished_at": time.time(),
                "worker_entered_at": rv.get("entered_at"),
            }
            with ckpt.as_directory() as d:
                save_segment(out, k, Path(d), summary)
            log.warning("segment %d finished: %d steps, loss %.4f", k, summary["steps"], summary["final_loss"] or float("nan"))
            return summary

        def drain(timeout: float) -> None:
            try:
                items = [queue.get(timeout=timeout)] + queue.get_nowait_batch(max(0, queue.qsize()))
            except Empty:
                return
            for m in items:
                for f in listeners:
                    try:
                        f(int(m["segment"]), m)
                    except Exception as e:  # noqa: BLE001 - a listener (e.g. MLflow) must not kill training
                        log.warning("progress listener failed: %s", e)

        with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
            futs = {k: pool.submit(fit, k) for k in todo}
            while not all(f.done() for f in futs.values()):
                drain(0.5)
            drain(0.01)
            for k, f in futs.items():
                try:
                    results[k] = f.result()
                except BaseException as e:  # noqa: BLE001 - report every failed segment, then raise
                    errors[k] = e
        if errors:
            k, e = next(iter(errors.items()))
            raise RuntimeError(f"segment(s) {sorted(errors)} failed; first error (segment {k}): {e}") from e
        phases["train_s"] = time.time() - t_start - sum(phases.values())
        teacher_stats = _teacher_stats(handles, cfg)
    finally:
        for h in handles:
            try:
                ray.kill(h)
            except Exception:  # noqa: BLE001
                pass
        if started_ray:
            ray.shutdown()
    phases["ray_shutdown_s"] = time.time() - t_start - sum(phases.values())
    return finish_run(cfg, out, teacher, scheduler, segments, shape, teacher_stats, t_start,
                      extra={"engine": "ray", "ray_address": address, "phases": phases})


def _print_progress(cfg: Config):
    def show(k: int, m: dict) -> None:
        print(f"[seg-{k:02d}] step {int(m['step']):>6}/{cfg.train.steps}  loss {m['loss_avg']:.4f}  "
              f"val {m['val_loss']:.4f}  {m['samples_per_s']:.0f} samples/s", flush=True)

    return show


def _teacher_stats(handles, cfg: Config) -> dict:
    import ray

    base = {"mode": cfg.teacher.mode, "replicas": cfg.teacher.replicas if cfg.teacher.mode == "actor" else 0}
    if not handles:
        return {**base, "requests": 0, "mean_batch": 0.0, "busy_s": 0.0}
    stats = ray.get([h.get_stats.remote() for h in handles])
    req = sum(s["requests"] for s in stats)
    fwd = sum(s["forwards"] for s in stats)
    return {**base, "requests": req, "forwards": fwd, "mean_batch": req / max(1, fwd),
            "mean_batch_samples": sum(s["samples"] for s in stats) / max(1, fwd),
            "busy_s": sum(s["busy_s"] for s in stats),
            "requests_by_segment": {c: sum(s["by_client"].get(c, 0) for s in stats)
                                    for c in sorted({c for s in stats for c in s["by_client"]})}}
