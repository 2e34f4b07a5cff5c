"""One Tune trial: a whole O2MKD run with sampled boundaries and widths; its objective and cost; clean-up of
its Train controllers when a scheduler stops it.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.atomic import write_json
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.tune.resolve import resolve_trial_config

log = logging.getLogger(__name__)


TRIAL_CPU = 0.01  # a trial's own actor; Tune rejects {"CPU": 0}, and the trial itself only waits on its trainers


def sampling_cost(cfg: Config, teacher, shape) -> dict:
    """Sampling MACs of the O2MKD students relative to the teacher, averaged over the timesteps.

    ``cost = Σ_k (b_{k+1} - b_k) · MACs(student_k) / (T · MACs(teacher))``: the expected per-step ratio when the
    sampler's timesteps spread evenly over ``[0, T)``. Students are built on the meta device (shapes only).

    Returns:
        ``cost``, ``macs`` (per student), ``teacher_macs``, ``params`` (per student).
    """
    import torch

    from o2mkd_ray.core.costs import count_macs, count_params
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.students import build_students

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


def refuse_text_to_image(cfg: Config, command: str) -> None:
    from o2mkd_ray.core.teacher import teacher_kind

    if teacher_kind(cfg.teacher) == "stable_diffusion":
        raise ConfigError(f"{command}: Stable Diffusion teachers are not supported by `o2mkd-ray {command}` yet (its "
                          "objectives read unconditional images); distil with `o2mkd-ray distill` and compare runs "
                          "with `o2mkd-ray eval`")


def objective_value(cfg: Config, out: str | Path, objective: str, teacher, scheduler, samples: int = 256,
                    images: int | None = None, steps: int | None = None) -> dict:
    """The final quality of a finished run folder (lower is better).

    Args:
        objective: ``agreement`` (student-vs-teacher ε MSE over t,
            :func:`~o2mkd_ray.eval.metrics.teacher_agreement`) or ``fidelity`` (image MSE teacher vs O2MKD from
            the same noise, DDIM, :func:`~o2mkd_ray.eval.metrics.trajectory_fidelity`).
    Returns:
        ``quality`` and the objective's own numbers.
    """
    from o2mkd_ray.data.build import build_dataset
    from o2mkd_ray.eval.metrics import teacher_agreement, trajectory_fidelity
    from o2mkd_ray.pipelines.unconditional import O2MKDPipeline

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


class TrialProgress:
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

    from o2mkd_ray.engine.ray_compat import controller_callback_base

    class RegisterController(controller_callback_base()):
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


def start_trial_registry(out: Path, teacher_names: list[str]) -> list:
    """In a trial: a controller registry; returns the Train callbacks that hook it into every segment trainer."""
    import ray

    registry = ray.remote(num_cpus=0)(_ControllerRegistry).remote()
    _ACTIVE.clear()
    _ACTIVE.update(registry=registry, teachers=teacher_names, out=out, stopping=False)
    return [_register_controller_cls()(registry)]


def stop_trial_trainers(timeout_s: float | None = None) -> dict:
    """Aborts the running trial's Train controllers and waits (bounded) until they are gone, then kills its
    teacher actors and the registry. Runs in the trial's process (the trainable's cleanup); returns counts."""
    import time

    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

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
    counts = {s: list(done.values()).count(s) for s in ("aborted", "ended", "timeout", "error")}
    if done and _ACTIVE.get("out") is not None:
        try:
            Path(_ACTIVE["out"]).mkdir(parents=True, exist_ok=True)
            write_json(Path(_ACTIVE["out"]) / _STOP_FILE, counts, indent=None)
        except OSError:
            pass
    _ACTIVE.clear()
    return counts


class _StopTrainersOnCleanup:
    """Mixin for :func:`run_trial`'s FunctionTrainable (``run_trial.__mixins__``): stops the trial's trainers in
    ``cleanup()``, which Tune runs (via ``stop()``) before it removes the trial's placement group."""

    def cleanup(self):
        try:
            stop_trial_trainers()
        except Exception as e:  # noqa: BLE001 - never keep Tune from stopping the trial
            log.warning("trial cleanup failed: %s", e)
        finally:
            super().cleanup()


def default_tracker(tracking_uri: str | None, cfg: Config, parent_run_id: str | None):
    from o2mkd_ray.tracking.tracker import RunTracker

    return RunTracker(tracking_uri, parent_run_id=parent_run_id)


def run_trial(config: dict, ctx: dict) -> None:
    """Tune function trainable: one whole O2MKD run (all its segments' TorchTrainers) for one sampled config."""
    from ray import tune

    from o2mkd_ray.core.teacher import load_teacher, sample_shape
    from o2mkd_ray.engine.driver import run_distillation, teacher_run_id
    from o2mkd_ray.engine.teacher_service import actor_names

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
    progress = TrialProgress(cfg.segments.n, cfg.train.steps, extra, tune.report)
    s = ctx["search"]
    teachers = actor_names(teacher_run_id(out), cfg.teacher.replicas) if cfg.teacher.mode == "actor" else []
    callbacks = start_trial_registry(out, teachers)
    try:
        report = run_distillation(cfg, out, progress=False, on_progress=progress, tracker=tracker,
                                  train_callbacks=callbacks)
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


run_trial.__mixins__ = (_StopTrainersOnCleanup,)  # wrap_function builds the trial's FunctionTrainable with it
