"""One Tune trial: a whole O2MKD run with sampled boundaries and widths, its objective and cost.

When a scheduler stops the trial, the trainable's clean-up (:mod:`o2mkd_ray.tune.stopping`) aborts its Train
controllers; the trial shares its :class:`~o2mkd_ray.tune.stopping.TrialState` with that clean-up.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable

import numpy as np

from o2mkd_ray.config.schema import Config
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.tune.resolve import resolve_trial_config
from o2mkd_ray.tune.stopping import TRIAL_START_TIMEOUT_S, StopTrainersOnCleanup, TrialState

log = logging.getLogger(__name__)


TRIAL_CPU = 0.01  # a trial's own actor; Tune rejects {"CPU": 0}, and the trial itself only waits on its trainers


def text_length(cfg: Config) -> int:
    """Text tokens of the conditional forward the cost counts: a text-to-image teacher's tokenizer length (what
    ``report.json`` counts, from the teacher pipeline's tokenizer; SD3: its CLIP tokens, then the T5 ones, as its
    ``encode_prompt`` concatenates them); 77 otherwise (unconditional UNets ignore it)."""
    from o2mkd_ray.core.teacher import teacher_kind
    from o2mkd_ray.distill.run_folder import is_text_to_image

    if not is_text_to_image(cfg):
        return 77
    from o2mkd_ray.core.sd import text_length as tokenizer_length

    if teacher_kind(cfg.teacher) == "sd3":
        from o2mkd_ray.core.sd3 import MAX_SEQUENCE_LENGTH

        return tokenizer_length(cfg.teacher.pretrained) + MAX_SEQUENCE_LENGTH
    return tokenizer_length(cfg.teacher.pretrained)


def sampling_cost(cfg: Config, teacher, shape, scheduler_config=None) -> dict:
    """Sampling MACs of the O2MKD students relative to the teacher, for one run of the config's sampler.

    ``cost`` is :func:`o2mkd_ray.core.costs.sampling_cost`'s ratio (what ``report.json`` calls
    ``macs_ratio_per_step``): each of the ``sampling.steps`` timesteps of ``sampling.scheduler`` runs on the
    student owning it. Students are built on the meta device (shapes only). The timesteps depend on the teacher's
    noise schedule: ``scheduler_config`` when the caller has it, else read with
    :func:`~o2mkd_ray.core.teacher.load_teacher`. Text-to-image UNets are counted on their conditional forward,
    with the teacher's text length (:func:`text_length`); classifier-free guidance doubles the teacher's and the
    students' calls alike (:func:`~o2mkd_ray.core.costs.guidance_passes`), which leaves the ratio as it is.

    Returns:
        ``cost``, ``macs`` (per student), ``teacher_macs``, ``params`` (per student), ``steps_per_student``.
    """
    import torch

    from o2mkd_ray.core.costs import forward_cost, sampler_timesteps
    from o2mkd_ray.core.costs import sampling_cost as run_cost
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import load_teacher

    seg = Segments(cfg.segments.boundaries)
    scratch = copy.deepcopy(cfg)
    scratch.students.init = "scratch"
    with torch.device("meta"):
        students = build_students(scratch, teacher, seg.n)
    seq_len = text_length(cfg)
    students = [forward_cost(s, shape, seq_len) for s in students]
    t_macs = forward_cost(teacher, shape, seq_len)["macs"]
    schedule = scheduler_config if scheduler_config is not None else load_teacher(cfg.teacher)[1].config
    timesteps = sampler_timesteps(cfg.sampling.scheduler, schedule, cfg.sampling.steps)
    run = run_cost([s["macs"] for s in students], t_macs, seg.boundaries, timesteps)
    return {"cost": float(run["macs_ratio"]), "macs": [s["macs"] for s in students], "teacher_macs": t_macs,
            "params": [s["params"] for s in students], "steps_per_student": run["steps_per_student"]}


def objective_value(cfg: Config, out: str | Path, objective: str, teacher, scheduler, samples: int = 256,
                    images: int | None = None, steps: int | None = None) -> dict:
    """The final quality of a finished run folder (lower is better), for any teacher kind.

    Args:
        objective: ``agreement``: student-vs-teacher output MSE over t
            (:func:`~o2mkd_ray.eval.metrics.teacher_agreement`) on the data the run distilled on
            (:func:`~o2mkd_ray.distill.run_folder.run_dataset`: for a text-to-image teacher the run's cached
            caption latents, each with its own caption's conditioning). ``fidelity``: image MSE of the students
            vs the teacher from the same noise: DDIM for unconditional runs
            (:func:`~o2mkd_ray.eval.metrics.trajectory_fidelity`); for text-to-image runs the pixel MSE of the
            evaluation ``o2mkd-ray eval`` runs (:func:`~o2mkd_ray.eval.evaluate.evaluate_run`: the teacher
            pipeline and the run's pipeline on the same ``images`` prompts, latents, guidance and sampler; its
            report lands in ``out/eval/``), and likewise for class-conditional (DiT) runs, on held-out class
            labels.
        samples: agreement draws; images, steps: fidelity's (default ``eval.num_images``, ``eval.steps``).
    Returns:
        ``quality`` and the objective's own numbers.
    """
    from o2mkd_ray.config.checks import CLASS_KINDS
    from o2mkd_ray.core.teacher import teacher_kind
    from o2mkd_ray.distill.run_folder import is_text_to_image, run_dataset
    from o2mkd_ray.eval.metrics import teacher_agreement

    out = Path(out)
    if objective == "agreement":
        from o2mkd_ray.pipelines.build import load_saved_students

        multi = load_saved_students(out / "pipeline").eval()
        dataset, _ = run_dataset(cfg, out, teacher, scheduler)  # a text-to-image run's cache is reused
        df = teacher_agreement(multi, teacher, scheduler, dataset, multi.segments, samples, 20, cfg.sampling.seed)
        v = float((df["mse"] * df["n"]).sum() / df["n"].sum())
        return {"quality": v, "agreement_mse": v}
    if objective != "fidelity":
        raise ConfigError(f"search.objective: must be agreement or fidelity, got {objective!r}")
    images, steps = images or cfg.eval.num_images, steps or cfg.eval.steps
    if is_text_to_image(cfg) or teacher_kind(cfg.teacher) in CLASS_KINDS:
        from o2mkd_ray.eval.evaluate import evaluate_run

        px = evaluate_run(out, images, steps, latency_repeats=0, device="cpu")["pixel"]
    else:
        from o2mkd_ray.eval.metrics import trajectory_fidelity
        from o2mkd_ray.pipelines.unconditional import O2MKDPipeline

        pipe = O2MKDPipeline.from_pretrained(out / "pipeline")
        pipe.set_progress_bar_config(disable=True)
        pipe.students.eval()
        px = trajectory_fidelity(teacher, pipe, steps, images, cfg.sampling.seed, cfg.data.value_range,
                                 scheduler_config=scheduler.config)
    return {"quality": px["mse_mean"], "fidelity_mse": px["mse_mean"], "fidelity_psnr_db": px["psnr_mean_db"]}


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
    """Aggregates per-segment reports: once every segment has reached step s, one Tune report for s.

    With per-segment budgets (``train.steps`` a list), a segment past its own budget stands at step s with its
    final report, so the trial keeps reporting up to the largest budget."""

    def __init__(self, n: int, total_steps: int | list[int], extra: dict, report: Callable[[dict], None]):
        self.budgets = list(total_steps) if isinstance(total_steps, list) else [total_steps] * n
        self.n, self.total, self.extra, self.report = n, max(self.budgets), extra, report
        self.by_step: dict[int, dict[int, dict]] = defaultdict(dict)
        self.finals: dict[int, dict] = {}  # segments that reached their budget: their last report
        self.last = 0

    def __call__(self, k: int, m: dict) -> None:
        s = int(m["step"])
        self.by_step[s][k] = m
        if s >= self.budgets[k]:
            self.finals[k] = m
        for step in sorted(self.by_step):
            self._aggregate(step)

    def _aggregate(self, s: int) -> None:
        got = {**{k: m for k, m in self.finals.items() if self.budgets[k] < s}, **self.by_step[s]}
        if len(got) < self.n or s <= self.last:
            return
        del self.by_step[s]
        ms = list(got.values())
        self.last = s
        if s >= self.total:  # the final report (with the objective) stands for the last step
            return
        val = [x.get("val_loss") if x.get("val_loss") is not None else x.get("loss_avg") for x in ms]
        q = float(np.mean(val))
        self.report({"step": s, "quality": q, "val_loss": q, "loss_avg": float(np.mean([x["loss_avg"] for x in ms])),
                     "samples_per_s": float(sum(x.get("samples_per_s") or 0 for x in ms)), "final": False,
                     **self.extra})


def default_tracker(tracking_uri: str | None, cfg: Config, parent_run_id: str | None):
    """The default ``tracker_factory`` of :func:`o2mkd_ray.tune.search.run_tuning` (bound to a tracking URI).

    Returns:
        An unstarted :class:`o2mkd_ray.tracking.tracker.RunTracker` nested under ``parent_run_id``.
    """
    from o2mkd_ray.tracking.tracker import RunTracker

    return RunTracker(tracking_uri, parent_run_id=parent_run_id)


@dataclasses.dataclass(frozen=True)
class TrialContext:
    """What every trial of a search gets (through ``tune.with_parameters``) besides its sample.

    ``base``: the config dict trials start from; ``constants``: entries merged into every sample; ``T``: the
    teacher's timesteps; ``trials_dir``, ``tune_dir``: ``OUT/tune/trials`` and ``OUT/tune``; ``cwd``: the
    caller's working directory; ``search``: the space's ``search:`` settings; ``tracker_factory``,
    ``parent_run_id``: MLflow (None: off); ``preflight``: whether trials run the engine's pre-flight even in a
    new folder (the space tunes keys only it checks).
    """

    base: dict
    constants: dict
    T: int
    trials_dir: str
    tune_dir: str
    cwd: str
    search: dict
    tracker_factory: Callable | None = None
    parent_run_id: str | None = None
    preflight: bool = False


def trial_config(ctx: TrialContext, config: dict, trial_id: str) -> Config:
    """A trial's Config: its sample on the search's base, with what every trial changes.

    Args:
        ctx: the search's context; config: the trial's Tune sample; trial_id: its id.
    Returns:
        The config ``run_distillation`` gets.
    """
    cfg = resolve_trial_config(ctx.base, {**ctx.constants, **config}, ctx.T)
    cfg.name = f"{cfg.name}-{trial_id}"
    cfg.eval.enabled = False  # the trial computes its own objective; no FID/latency pass per trial
    cfg.mlflow.log_pipeline = False  # a pyfunc model per trial would be heavy; best.yaml is the product
    cfg.ray.max_failures = 0  # no Train retries in a trial: a retry racing a stop leaks a placement group
    if cfg.ray.storage_path:  # trials must not share seg-KK trainer folders
        from o2mkd_ray.engine.storage import join_storage

        cfg.ray.storage_path = join_storage(cfg.ray.storage_path, "tune-trials", trial_id)
    return cfg


def teacher_actor_names(cfg: Config, out: Path) -> list[str]:
    """The names of the teacher actors ``run_distillation`` starts for ``out`` (none unless ``teacher.mode`` is
    ``actor``)."""
    from o2mkd_ray.engine.driver import teacher_run_id
    from o2mkd_ray.engine.teacher_service import actor_names

    return actor_names(teacher_run_id(out), cfg.teacher.replicas) if cfg.teacher.mode == "actor" else []


def start_trial_tracker(ctx: TrialContext, cfg: Config, out: Path, trial_id: str):
    """The trial's MLflow run, started and nested under the search's; None without tracking."""
    if ctx.tracker_factory is None:
        return None
    tracker = ctx.tracker_factory(cfg, ctx.parent_run_id)
    tracker.start(cfg, out, tags={"o2mkd.kind": "tune-trial", "o2mkd.trial_id": trial_id,
                                  "o2mkd.tune_out": ctx.tune_dir})
    return tracker


def skip_preflight(ctx: TrialContext, out: Path) -> bool:
    """Whether a trial may skip the engine's pre-flight (``run_distillation(checked=True)``).

    The search ran it on the base and budgeted configs and a trial checks its own segments and students, so it
    may when the space tunes nothing else the pre-flight checks and ``out`` is new (nothing there to check; a
    resumed trial's folder is checked again).

    Args:
        ctx: the search's context; out: the trial's run folder.
    Returns:
        True to pass ``checked=True``.
    """
    return not ctx.preflight and not out.exists()


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Tune function trainable: one whole O2MKD run (all its segments' TorchTrainers) for one sampled config.

    Args:
        config: the trial's Tune sample; ctx: the search's :class:`TrialContext`.
    """
    from ray import tune

    from o2mkd_ray.core.teacher import load_teacher, sample_shape
    from o2mkd_ray.engine.driver import run_distillation

    os.chdir(ctx.cwd)  # Tune starts trials in their own folder; relative paths in the config mean the caller's
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", TRIAL_START_TIMEOUT_S)  # bounds cleanup's wait
    trial_id = tune.get_context().get_trial_id()
    out = Path(ctx.trials_dir) / trial_id
    checked = skip_preflight(ctx, out)  # before anything creates out
    cfg = trial_config(ctx, config, trial_id)
    state = TrialState.open(trial_id)  # the trainable's own (StopTrainersOnCleanup.setup), found by the trial id
    state.record(out, teacher_actor_names(cfg, out))
    if state.stopping():
        return  # stopped before it started
    teacher, scheduler = load_teacher(cfg.teacher)
    shape = sample_shape(teacher, cfg.data.channels, cfg.data.resolution)
    cost = sampling_cost(cfg, teacher, shape, scheduler.config)  # the teacher is loaded: no second load
    tracker = start_trial_tracker(ctx, cfg, out, trial_id)
    extra = {"cost": cost["cost"], "n": cfg.segments.n, "mlflow_run_id": getattr(tracker, "run_id", None) or ""}
    progress = TrialProgress(cfg.segments.n, cfg.train.steps, extra, tune.report)  # a list: one per segment
    s = ctx.search
    try:
        report = run_distillation(cfg, out, progress=False, on_progress=progress, tracker=tracker,
                                  train_callbacks=state.train_callbacks(), checked=checked)
        obj = objective_value(cfg, out, s["objective"], teacher, scheduler, s["eval_samples"], s["eval_images"],
                              s["eval_steps"])
    except BaseException:
        stopping = state.stopping()  # set by the cleanup: stopped by Tune, the trainers aborted on purpose
        if tracker is not None:
            tracker.finish("KILLED" if stopping else "FAILED")
        if stopping:
            return
        raise
    real_cost = float(report["macs_ratio_per_step"])  # report.json's run-weighted ratio, on the trained students
    vals = [x.get("val_loss") for x in report["segments"] if x.get("val_loss") is not None]
    final = {**extra, **obj, "step": cfg.train.max_steps, "cost": real_cost, "objective": s["objective"],
             "val_loss": float(np.mean(vals)) if vals else float("nan"), "final": True,
             "run_wall_s": float(report.get("wall_s", 0.0))}
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in final.items() if isinstance(v, (int, float)) and k != "final"})
        tracker.finish("FINISHED")
    tune.report(final)


run_trial.__mixins__ = (StopTrainersOnCleanup,)  # wrap_function builds the trial's FunctionTrainable with it


def trial_trainable(ctx: TrialContext, trial_cfg: Config):
    """What the Tuner runs: :func:`run_trial` with the search's context and a trial's resources.

    Args:
        ctx: the search's context; trial_cfg: the config trials start from (:func:`trial_resources`).
    Returns:
        The function trainable (``tune.with_parameters`` keeps ``__mixins__``, so its cleanup stops the trainers).
    """
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_resources(trial_cfg))
