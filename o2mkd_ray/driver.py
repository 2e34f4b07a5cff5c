"""``run_distillation(cfg, out)``: Ray up, the shared teacher service, one TorchTrainer per segment (all in flight
at once), then the diffusers pipeline, ``samples.png`` and ``report.json``.

``run_local`` is the same job as a plain single-process loop over the segments (no Ray): a baseline for the
orchestration benchmark and a fallback for debugging.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .config import Config, ConfigError
from .segments import Segments

log = logging.getLogger("o2mkd_ray")

# Ray Train V2 polls workers every 2 s by default and report() waits for it (RAY_NOTES): poll faster.
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.3",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_DEDUP_LOGS": "1",
}


# --------------------------------------------------------------------------------------------------------------
# pre-flight: everything that can be wrong with the user's input, before any Ray work


def preflight(cfg: Config, out: str | Path, strict: bool = True) -> Path:
    """Validates teacher, data and output folder. Raises ConfigError (one line) on bad input.

    Args:
        strict: False for ``--dry-run``: missing optional packages (torchvision, datasets) only warn.
    """
    from .config import check_out_path
    from .data import check_data
    from .teacher import check_run

    check_run(cfg)  # teacher files + segments vs the teacher's T + every student's shape (meta device)
    for w in check_data(cfg.data, strict=strict):
        log.warning("%s", w)
    out = check_out_path(out).resolve()  # a file, a path under a file, read-only: one line, nothing created
    prev = out / "config.json"
    if prev.is_file():
        try:
            old = json.loads(prev.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"--out {str(out)!r}: config.json is corrupted; use a new --out folder") from None
        if _run_hash(old) != _run_hash(cfg.to_dict()):
            raise ConfigError(
                f"--out {str(out)!r} already holds a different run (config differs); use a new --out or the same config to resume"
            )
    elif out.is_dir() and any(p.name not in (".", "..") for p in out.iterdir()):
        if not (out / "ray").exists():
            raise ConfigError(f"--out {str(out)!r} is not empty and holds no o2mkd-ray run; use an empty or new folder")
    return out


def _run_hash(d: dict) -> str:
    # what makes two runs "the same run" (resumable into one --out): everything but runtime placement / tracking
    keep = {k: v for k, v in d.items() if k not in ("ray", "mlflow", "eval", "debug", "sampling")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------------------------------------------


def _init_ray(cfg: Config):
    import ray

    if ray.is_initialized():
        return False, ray.get_runtime_context().gcs_address
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    quiet = dict(configure_logging=True, logging_level=logging.WARNING)
    if address:
        from .config import check_ray_address

        # ray.init on a dead address retries for minutes (measured: >5 min for 127.0.0.1:1): one TCP connect first
        check_ray_address(address, "ray.address" if cfg.ray.address else "RAY_ADDRESS")
        try:
            ray.init(address=address, **quiet)  # an existing cluster: bare init (num_cpus would be rejected)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"ray.address: cannot connect to Ray at {address!r} ({str(e).splitlines()[0]}); "
                              "start it with `ray start --head` or unset ray.address/RAY_ADDRESS") from None
    else:
        os.environ.update(RAY_ENV)  # inherited by the local raylet's workers and the Train controller
        tmp = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="o2mkd-ray-")
        # the dashboard serves Ray's State API (Train's cleaners poll it) and `ray job`; bound to 127.0.0.1
        ray.init(num_cpus=cfg.ray.num_cpus or os.cpu_count(), include_dashboard=True,
                 dashboard_host=cfg.ray.dashboard_host, _temp_dir=tmp,
                 runtime_env={"env_vars": dict(RAY_ENV)}, **quiet)
    return True, ray.get_runtime_context().gcs_address


def _student_init(cfg: Config, teacher, n: int) -> list[dict]:
    from .students import build_students

    out = []
    for s in build_students(cfg, teacher, n):
        out.append({"class": type(s).__name__,
                    "config": {k: v for k, v in dict(s.config).items() if not k.startswith("_")},
                    "state": {k: v.detach().cpu().numpy() for k, v in s.state_dict().items()}})
    return out


# Extra Ray Train run callbacks given to every segment trainer this process starts (RunConfig(callbacks=...)).
# Empty by default. A hook for o2mkd_ray.tuning: a Tune trial registers each of its trainers' controllers through
# it, so that a trial stopped by the scheduler can abort its trainers before Tune frees the trial's resources.
EXTRA_TRAIN_CALLBACKS: list = []


def _trainer(cfg: Config, k: int, loop_config: dict, storage: str):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .train_loop import train_loop_per_worker

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
            name=f"seg-{k:02d}",  # stable: a rerun with the same --out resumes in place (RAY_NOTES)
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep, checkpoint_score_attribute="step",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=r.max_failures),
            callbacks=list(EXTRA_TRAIN_CALLBACKS) or None,
        ),
    )


def _finished(out: Path, k: int) -> dict | None:
    f = out / "segments" / f"seg-{k:02d}" / "summary.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _save_segment(out: Path, k: int, ckpt_dir: Path, summary: dict) -> None:
    """Copies the chosen checkpoint's EMA student into OUT/segments/seg-kk (atomic) and writes its summary."""
    dest = out / "segments" / f"seg-{k:02d}"
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(ckpt_dir / "ema", tmp / "ema")
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


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
                     parent_run_id: str | None = None) -> dict:
    """Distils the teacher into ``segments.n`` students, one Ray TorchTrainer per segment, all concurrently;
    tracks the run in MLflow (parent run + one child per segment) and runs the quick evaluation.

    Args:
        cfg: validated config.
        out: run folder (created; an existing folder with the same config resumes).
        progress: print one line per segment report.
        on_progress: called in the driver as ``on_progress(segment, metrics)`` for every report of every
            segment while training runs (Tune trials use it to report intermediate results).
        tracker: an already started :class:`o2mkd_ray.tracking.RunTracker`; None makes one when
            ``mlflow.enabled`` (nested under ``parent_run_id`` if given).
    Returns:
        The report dict (also written to ``OUT/report.json``).
    """
    return _tracked(cfg, out, "ray", tracker, parent_run_id,
                    lambda tr: _run_ray(cfg, out, progress, on_progress, tr))


def _tracked(cfg: Config, out, engine: str, tracker, parent_run_id, body) -> dict:
    """Pre-flight, MLflow parent run around ``body(tracker)``, quick evaluation, artifacts, final report."""
    out = preflight(cfg, out)
    own = tracker is None and cfg.mlflow.enabled
    if own:
        from .tracking import RunTracker, resolve_tracking_uri

        tracker = RunTracker(resolve_tracking_uri(cfg, out), parent_run_id=parent_run_id,
                             http_timeout_s=cfg.mlflow.timeout_s, max_call_s=2 * cfg.mlflow.timeout_s)
        tracker.start(cfg, out, tags={"o2mkd.engine": engine})
    try:
        report = body(tracker)
        if cfg.eval.enabled:
            report["eval"] = _quick_eval(cfg, out, tracker)
            (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        if tracker is not None:
            tracker.log_artifacts([out / f for f in ("config.json", "samples.png", "history.json")])
            if cfg.mlflow.log_pipeline:
                tracker.log_pipeline(out / "pipeline")
            report["mlflow"] = tracker.summary()
            (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
            tracker.log_artifacts([out / "report.json"])
            report["mlflow"] = tracker.summary()  # run ids can be filled late if the server was down
            (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    except BaseException:
        if own:
            tracker.finish("FAILED")
        raise
    if own:
        tracker.finish("FINISHED")
    return report


def _quick_eval(cfg: Config, out: Path, tracker) -> dict:
    """``distill``'s default end: a short evaluation (``eval.*``), its files and metrics logged to MLflow."""
    from .evaluation import evaluate_run

    try:
        ev = evaluate_run(out, num_images=cfg.eval.num_images, steps=cfg.eval.steps, latency_repeats=2,
                          agreement_samples=128, num_reference=256)
    except Exception as e:  # noqa: BLE001 - the students are saved; a failed evaluation must not lose them
        log.warning("quick evaluation failed (%s); rerun `o2mkd-ray eval %s`", e, out)
        return {"error": str(e)}
    if tracker is not None:
        tracker.log_metrics({f"eval/{k}": v for k, v in ev.get("metrics", {}).items()})
        tracker.log_artifacts([out / "eval"])  # a folder keeps its name: eval/...
    return ev.get("metrics", {})


def _prepare_run(cfg: Config, out, tracker):
    """Both engines' start: OUT/config.json, the teacher and its scheduler, input shape, segments."""
    from .teacher import load_teacher, sample_shape

    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.to_json())
    teacher, scheduler = load_teacher(cfg.teacher)
    shape = sample_shape(teacher, cfg.data.channels, cfg.data.resolution)
    segments = Segments.from_config(cfg.segments, scheduler.config.num_train_timesteps)
    if tracker is not None:
        tracker.set_boundaries(list(segments.boundaries))
    return out, teacher, scheduler, shape, segments


def teacher_run_id(out: str | Path) -> str:
    """The id in the run's teacher actor names (``teacher_service.actor_names``): stable per resolved --out."""
    return hashlib.sha1(str(Path(out).expanduser().resolve()).encode()).hexdigest()[:8]


def _run_ray(cfg: Config, out, progress, on_progress, tracker) -> dict:
    """The Ray part of :func:`run_distillation`: teacher actors, N concurrent TorchTrainers, assembly."""
    import ray
    from ray.util.queue import Empty, Queue

    from .teacher import TeacherFn
    from .teacher_service import actor_names, start_teacher

    t_start = time.time()
    out, teacher, scheduler, shape, segments = _prepare_run(cfg, out, tracker)
    phases = {"load_s": time.time() - t_start}
    started_ray, address = _init_ray(cfg)
    if tracker is not None:
        tracker.log_dict({"ray_address": address}, "ray.json")
    phases["ray_init_s"] = time.time() - t_start - sum(phases.values())
    storage = cfg.ray.storage_path or str(out / "ray")
    run_id = teacher_run_id(out)
    handles = []
    try:
        todo = [k for k in range(segments.n) if _finished(out, k) is None]
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
        if todo and _is_sd(cfg):  # latents + text embeddings, once, shared by segments
            from .teacher_service import TeacherClient

            cond = _cond_data(cfg, out, teacher, scheduler, TeacherClient(names, client="synth") if names else None)
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
            result = _trainer(cfg, k, loop_config, storage).fit()
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
                _save_segment(out, k, Path(d), summary)
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


def _is_sd(cfg: Config) -> bool:
    from .teacher import teacher_kind

    return teacher_kind(cfg.teacher) == "stable_diffusion"


def _cond_data(cfg: Config, out: Path, teacher, scheduler, teacher_fn) -> dict:
    """Text-to-image runs: cached caption latents + embeddings (OUT/cache), synthesised by ``teacher_fn`` if needed."""
    from .sd import build_cond_data

    t0 = time.time()
    cond = build_cond_data(cfg, teacher, dict(scheduler.config), teacher=teacher_fn, cache_dir=out / "cache",
                           log=lambda m: log.warning("%s", m))
    log.warning("text-to-image data: %d captions, latents %s, embeddings %s (%.1f s)", len(cond["prompts"]),
                tuple(cond["latents"].shape), tuple(cond["embeds"].shape), time.time() - t0)
    return cond


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


def finish_run(cfg: Config, out: Path, teacher, scheduler, segments: Segments, shape, teacher_stats: dict,
               t_start: float, extra: dict | None = None) -> dict:
    """Assembles OUT/pipeline from OUT/segments/*, writes samples.png and report.json."""
    from .assemble import build_pipeline, costs, load_student, make_scheduler, write_samples

    summaries = [_finished(out, k) for k in range(segments.n)]
    students = [load_student(out / "segments" / f"seg-{k:02d}", use_ema=True) for k in range(segments.n)]
    seq_len, sd = 77, _is_sd(cfg)
    if sd:  # text-to-image: the students share the teacher's VAE, text encoder and tokenizer
        from .assemble import build_sd_pipeline, sampling_prompts, teacher_sd_pipeline, write_sd_samples

        teacher_pipe = teacher_sd_pipeline(cfg, teacher)
        seq_len = teacher_pipe.tokenizer.model_max_length
        pipe = build_sd_pipeline(students, segments.boundaries, teacher_pipe, cfg.sampling.scheduler)
    else:
        sampler = make_scheduler(cfg.sampling.scheduler, scheduler.config)
        pipe = build_pipeline(students, segments.boundaries, sampler, cfg.data.value_range)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    seg_reports = []
    for k, (s, st) in enumerate(zip(summaries, students)):
        seg_reports.append({**{key: v for key, v in s.items() if key != "history"}, **costs(st, shape, seq_len)})
    t0 = time.time()
    if sd:
        samples = write_sd_samples(cfg, teacher_pipe, pipe, sampling_prompts(cfg), out / "samples.png")
    else:
        samples = write_samples(cfg, teacher, pipe, scheduler.config, shape, out / "samples.png")
    samples["wall_s"] = round(time.time() - t0, 2)
    t_cost = costs(teacher, shape, seq_len)
    report = {
        "name": cfg.name, "out": str(out), "num_segments": segments.n, "boundaries": list(segments.boundaries),
        "segments": seg_reports, "teacher": {**teacher_stats, **t_cost}, "samples": samples,
        "macs_ratio_per_step": float(np.mean([s["macs"] for s in seg_reports])) / max(1, t_cost["macs"]),
        "wall_s": round(time.time() - t_start, 2), **(extra or {}),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "history.json").write_text(json.dumps({s["index"]: s.get("history", []) for s in summaries}, default=str))
    return report


def run_local(cfg: Config, out: str | Path, progress: bool = True, tracker=None,
              parent_run_id: str | None = None) -> dict:
    """The same distillation as :func:`run_distillation` without Ray: segments one after another, in-process."""
    return _tracked(cfg, out, "local", tracker, parent_run_id, lambda tr: _run_local(cfg, out, progress, tr))


def _run_local(cfg: Config, out, progress: bool, tracker) -> dict:
    from .distill import run_segment
    from .data import build_dataset
    from .students import build_students
    from .teacher import TeacherFn
    from .teacher_service import LocalTeacher

    t_start = time.time()
    out, teacher, scheduler, shape, segments = _prepare_run(cfg, out, tracker)
    fn = TeacherFn(teacher, cfg.kd.feature_blocks)
    channels = fn.feature_channels(shape) if cfg.kd.lambda_feat > 0 else {}
    lt = LocalTeacher(fn)
    uncond = None
    if _is_sd(cfg):
        from .sd import cond_dataset

        cond = _cond_data(cfg, out, teacher, scheduler, lt)
        dataset, uncond = cond_dataset(cond)
    else:
        dataset = build_dataset(cfg.data)
    students = build_students(cfg, teacher, segments.n)
    for k in range(segments.n):
        if _finished(out, k) is not None:
            continue
        ckdir = out / "local" / f"seg-{k:02d}"
        res = run_segment(cfg, k, segments, scheduler, students[k], lt, channels, dataset, ckpt_dir=ckdir,
                          progress=progress, on_report=(lambda m, k=k: tracker.on_progress(k, m)) if tracker else None,
                          uncond=uncond)
        last = sorted(ckdir.glob("checkpoint_*"))[-1]
        summary = {"index": k, "boundaries": list(segments.range(k)), "started_at": res["started_at"],
                   "finished_at": res["finished_at"], "steps": res["steps"], "resumed_from": 0,
                   "final_loss": res["final_loss"], "val_loss": res["val_loss"],
                   "samples_per_s": res["samples_per_s"], "checkpoint": str(last), "history": res["history"]}
        _save_segment(out, k, last, summary)
    stats = {"mode": "local", "replicas": 0, "requests": lt.calls, "mean_batch": 1.0, "busy_s": lt.latency_s}
    return finish_run(cfg, out, teacher, scheduler, segments, shape, stats, t_start, extra={"engine": "local"})
