"""Evaluation of a distill run: teacher agreement per timestep, trajectory fidelity, FID/KID, cost, latency.

Plain torch/diffusers (no Ray, no MLflow). ``evaluate_run(OUT)`` writes ``OUT/eval/`` (``report.json``,
``report.md``, ``samples_grid.png``, ``agreement_vs_t.png``, ``quality_vs_cost.png``) and returns the report
with the list of written files, for the caller to log.

The FID/KID feature spaces and distances live in :mod:`o2mkd_ray.fid`, the plots and ``report.md`` in
:mod:`o2mkd_ray.eval_report`; their names are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from .assemble import make_scheduler, save_grid, student_images, teacher_images
from .config import ConfigError
from .eval_report import (  # noqa: F401 - re-exported: evaluation's public API (_plt: the other plots)
    _finite,
    _markdown,
    _plt,
    _table,
    plot_agreement,
    plot_quality_vs_cost,
)
from .fid import (  # noqa: F401 - re-exported: evaluation's public API
    _SEED_OFFSET,
    FID_WEIGHTS_ENV,
    REFERENCE_IMAGES,
    FeatureSpace,
    fid_feature_space,
    fid_kid,
    frechet_distance,
    kernel_inception_distance,
    random_conv_features,
    random_conv_net,
    reference_images,
)
from .segments import Segments

PSNR_CAP_DB = 100.0  # PSNR of identical images (MSE 0) is +inf; reported as this cap


# ------------------------------------------------------------------------------------------------------------
# teacher agreement per timestep


def _eps(out) -> torch.Tensor:
    from .teacher import eps_of

    return eps_of(out)  # (eps, feats) tuples, UNet2DOutput and plain tensors alike


@torch.no_grad()
def teacher_agreement(multi, teacher_fn: Callable, scheduler, dataset, segments=None, num_samples: int = 256,
                      num_buckets: int = 20, seed: int = 0, batch_size: int = 64) -> pd.DataFrame:
    """Student-vs-teacher ε error as a function of t, on the training forward process.

    ``x_0`` are drawn from ``dataset`` with a fixed generator (the dataset has no held-out split, but the
    noise and timesteps are fresh draws, and the distillation target is the teacher's output, not ``x_0``);
    ``t`` is a jittered grid over ``[0, T)`` (one t per stretch of ``T/num_samples`` timesteps);
    ``x_t = add_noise(x_0, ε, t)``.

    Args:
        multi: a :class:`MultiStudentUNet` (routes each sample to the student owning its t).
        teacher_fn: ``teacher_fn(x_t, t) -> (eps, feats)`` (a :class:`~o2mkd_ray.teacher.TeacherFn`), or a
            model.
        scheduler: the teacher's training noise scheduler (``add_noise``).
        dataset: items ``(x_0,)`` with ``x_0: (C, H, W)``.
        segments: :class:`Segments` or boundaries; default ``multi.segments``.
        num_samples: number of ``(x_0, ε, t)`` draws.
        num_buckets: equal-width timestep buckets over ``[0, T)``.
        seed: generator seed.
        batch_size: forward batch.
    Returns:
        One row per (bucket ∩ segment): ``t_lo, t_hi`` (t_lo <= t < t_hi), ``segment``, ``n``, ``mse``
        (student vs teacher ε, mean over samples and pixels), ``teacher_task_mse`` (teacher vs the true ε, for
        scale).
        :func:`segment_summary` reduces it per segment.
    """
    if segments is None:
        segments = multi.segments
    elif not isinstance(segments, Segments):
        segments = Segments(segments)
    T = segments.num_train_timesteps
    p = next(multi.parameters())
    g = torch.Generator().manual_seed(_SEED_OFFSET + seed)
    order = torch.randperm(len(dataset), generator=g)
    idx = order.repeat(math.ceil(num_samples / len(dataset)))[:num_samples]
    # jittered grid: every stretch of T/num_samples timesteps gets exactly one sample
    u = torch.rand(num_samples, generator=g, dtype=torch.float64)
    t = ((torch.arange(num_samples, dtype=torch.float64) + u) * T / num_samples).floor().long()
    t = t.clamp(0, T - 1)
    mse, task = [], []
    for s in range(0, num_samples, batch_size):
        x_0 = torch.stack([dataset[int(i)][0] for i in idx[s:s + batch_size]])  # (B, C, H, W)
        t_b = t[s:s + batch_size]
        eps = torch.randn(x_0.shape, generator=g)
        x_t = scheduler.add_noise(x_0, eps, t_b)
        eps_S = multi(x_t.to(p.device, p.dtype), t_b.to(p.device)).sample.float().cpu()
        eps_T = _eps(teacher_fn(x_t.to(p.device), t_b.to(p.device))).float().cpu()
        mse.append(((eps_S - eps_T) ** 2).flatten(1).mean(1))
        task.append(((eps_T - eps) ** 2).flatten(1).mean(1))
    df = pd.DataFrame({"t": t.numpy(), "segment": segments.owner(t).numpy(),
                       "bucket": (t * num_buckets // T).numpy(),
                       "mse": torch.cat(mse).double().numpy(), "task": torch.cat(task).double().numpy()})
    rows = []
    for (b, k), grp in df.groupby(["bucket", "segment"], sort=True):
        lo, hi = segments.range(int(k))
        # bucket b holds ceil(b T / nb) <= t < ceil((b + 1) T / nb), matching t * nb // T == b
        b_lo, b_hi = -(-int(b) * T // num_buckets), -(-(int(b) + 1) * T // num_buckets)
        rows.append({"t_lo": max(lo, b_lo), "t_hi": min(hi, b_hi), "segment": int(k), "n": len(grp),
                     "mse": float(grp["mse"].mean()), "teacher_task_mse": float(grp["task"].mean())})
    return pd.DataFrame(rows).sort_values("t_lo", ignore_index=True)


def segment_summary(agreement: pd.DataFrame) -> pd.DataFrame:
    """Per-segment rows (``segment, t_lo, t_hi, n, mse, teacher_task_mse``) from :func:`teacher_agreement`."""
    rows = []
    for k, grp in agreement.groupby("segment", sort=True):
        w = grp["n"] / grp["n"].sum()
        rows.append({"segment": int(k), "t_lo": int(grp["t_lo"].min()), "t_hi": int(grp["t_hi"].max()),
                     "n": int(grp["n"].sum()), "mse": float((grp["mse"] * w).sum()),
                     "teacher_task_mse": float((grp["teacher_task_mse"] * w).sum())})
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------------------
# trajectory fidelity


def _pipe_shape(pipe) -> tuple[int, int, int]:
    cfg = pipe.students.config
    size = cfg.sample_size
    return (cfg.in_channels, *((size, size) if isinstance(size, int) else tuple(size)))


@contextlib.contextmanager
def _scheduler(pipe, scheduler):
    old = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield pipe
    finally:
        pipe.scheduler = old


def trajectory_fidelity(teacher_model: nn.Module, pipe, steps: int, num_images: int, seed: int, value_range,
                        scheduler_config=None, psnr_cap_db: float = PSNR_CAP_DB) -> dict:
    """Teacher and O2MKD sampled from the same initial noise with deterministic DDIM (eta=0) at ``steps``.

    Args:
        teacher_model: the teacher ε-network.
        pipe: an :class:`O2MKDPipeline` (its scheduler is swapped for DDIM during the call, then restored).
        steps: DDIM steps for both.
        num_images: images (= per-sample comparisons).
        seed: noise seed (both draw the same ``(N, C, H, W)`` noise from it).
        value_range: the data range, mapped to [0, 1] before comparing.
        scheduler_config: the noise schedule for DDIM; default ``pipe.scheduler.config``.
        psnr_cap_db: PSNR reported for MSE == 0 (and the ceiling for all samples).
    Returns:
        ``per_sample`` (DataFrame: sample, mse, psnr_db, capped), ``mse_mean``, ``mse_max``, ``psnr_mean_db``,
        ``psnr_min_db``, ``psnr_cap_db``, ``num_capped``, and the images ``teacher_images`` / ``o2mkd_images``
        (``(N, H, W, C)`` in [0, 1]).
    """
    base = scheduler_config if scheduler_config is not None else pipe.scheduler.config
    t_img = teacher_images(teacher_model, make_scheduler("ddim", base), _pipe_shape(pipe), value_range,
                           num_images, steps, seed, eta=0.0)
    with _scheduler(pipe, make_scheduler("ddim", base)):
        s_img = student_images(pipe, num_images, steps, seed, eta=0.0)
    mse = ((t_img.astype(np.float64) - s_img.astype(np.float64)) ** 2).reshape(num_images, -1).mean(1)
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10.0 * np.log10(1.0 / np.maximum(mse, 1e-300)), np.inf)  # peak 1.0 in [0, 1]
    capped = psnr >= psnr_cap_db
    psnr = np.minimum(psnr, psnr_cap_db)
    per = pd.DataFrame({"sample": np.arange(num_images), "mse": mse, "psnr_db": psnr, "capped": capped})
    return {"per_sample": per, "mse_mean": float(mse.mean()), "mse_max": float(mse.max()),
            "psnr_mean_db": float(psnr.mean()), "psnr_min_db": float(psnr.min()),
            "psnr_cap_db": float(psnr_cap_db),
            "num_capped": int(capped.sum()), "teacher_images": t_img, "o2mkd_images": s_img}


# ------------------------------------------------------------------------------------------------------------
# cost


def cost_report(teacher_model: nn.Module, multi, steps: int, scheduler_config, shape) -> dict:
    """Params and MACs per step of the teacher and each student, and for a whole DDIM sampling run per image.

    A run of ``steps`` steps costs ``Σ_t MACs(owner(t))`` for O2MKD (each step on the student owning its t)
    against ``steps × MACs(teacher)``. MACs via :func:`o2mkd_ray.students.count_macs` at batch 1.
    """
    from .students import count_macs, count_params

    sched = make_scheduler("ddim", scheduler_config)
    sched.set_timesteps(steps)
    owners = [multi.segments.owner(int(t)) for t in sched.timesteps]
    t_macs = int(count_macs(teacher_model, (1, *shape)))
    t_params = int(count_params(teacher_model))
    students = []
    for k in range(multi.num_students):
        lo, hi = multi.segments.range(k)
        s = multi.student(k)
        macs = int(count_macs(s, (1, *shape)))
        n = owners.count(k)
        students.append({"segment": k, "t_lo": lo, "t_hi": hi, "params": int(count_params(s)),
                         "macs_per_step": macs, "steps_in_run": n, "macs_in_run": macs * n})
    run = sum(s["macs_in_run"] for s in students)
    total = sum(s["params"] for s in students)
    return {
        "steps": steps,
        "teacher": {"params": t_params, "macs_per_step": t_macs, "macs_per_run": t_macs * steps},
        "students": students,
        "o2mkd": {"params_total": total, "params_max_student": max(s["params"] for s in students),
                  "macs_per_run": run, "mean_macs_per_step": run / max(1, steps)},
        "macs_ratio_run": run / max(1, t_macs * steps),  # O2MKD / teacher, same steps
        "params_ratio_max_student": max(s["params"] for s in students) / max(1, t_params),  # held per step
        "params_ratio_total": total / max(1, t_params),  # held in memory for a whole run
    }


def latency(teacher_model: nn.Module, pipe, steps: int, batch: int, value_range, scheduler_config=None,
            repeats: int = 3, seed: int = 0) -> dict:
    """Wall-clock seconds of one DDIM sampling run, teacher vs O2MKD, same steps and batch; median of
    ``repeats`` interleaved runs after one warm-up each. ``speedup`` = teacher / O2MKD."""
    base = scheduler_config if scheduler_config is not None else pipe.scheduler.config
    shape = _pipe_shape(pipe)
    sync = torch.cuda.synchronize if next(teacher_model.parameters()).is_cuda else (lambda: None)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    def run_teacher():
        teacher_images(teacher_model, make_scheduler("ddim", base), shape, value_range, batch, steps, seed)

    def run_o2mkd():
        student_images(pipe, batch, steps, seed)

    with _scheduler(pipe, make_scheduler("ddim", base)):
        run_teacher(), run_o2mkd()  # warm-up
        t_runs, s_runs = [], []
        for _ in range(max(1, repeats)):
            t_runs.append(timed(run_teacher))
            s_runs.append(timed(run_o2mkd))
    t_med, s_med = float(np.median(t_runs)), float(np.median(s_runs))
    return {"steps": steps, "batch": batch, "repeats": len(t_runs), "teacher_s": t_med, "o2mkd_s": s_med,
            "speedup": t_med / s_med if s_med > 0 else None, "teacher_runs_s": t_runs, "o2mkd_runs_s": s_runs,
            "device": str(next(teacher_model.parameters()).device), "torch_threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------------------
# a run folder -> OUT/eval/


def _check_run_folder(out) -> Path:
    if out is None or str(out) == "":
        raise ConfigError("eval: give the run folder, e.g. `o2mkd-ray eval runs/digits`")
    p = Path(out).expanduser()
    if not p.exists():
        raise ConfigError(f"eval: run folder {str(p)!r} does not exist; give the --out folder of a distill "
                          "run")
    if not p.is_dir():
        raise ConfigError(f"eval: {str(p)!r} is a file; give the --out folder of a distill run")
    missing = [n for n in ("config.json", "pipeline/model_index.json") if not (p / n).is_file()]
    if missing:
        raise ConfigError(f"eval: {str(p)!r} is not a finished o2mkd-ray run folder (no "
                          f"{', '.join(missing)}); give the --out folder of a completed "
                          "`o2mkd-ray distill` run")
    return p.resolve()


def evaluate_run(out, num_images: int | None = None, steps: int | None = None, *,
                 agreement_samples: int = 256, num_buckets: int = 20, num_reference: int = REFERENCE_IMAGES,
                 latency_repeats: int = 3, device: str | None = None) -> dict:
    """Evaluates a distill run folder and writes ``OUT/eval/``.

    Args:
        out: the run folder (``config.json``, ``pipeline/``).
        num_images: generated images per model (default ``eval.num_images``); also the latency batch.
        steps: DDIM steps (default ``eval.steps``).
        agreement_samples, num_buckets: see :func:`teacher_agreement`.
        num_reference: dataset images for the FID/KID reference.
        latency_repeats: timed runs per model.
        device: default CUDA when available, else CPU.
    Returns:
        The report (as written to ``OUT/eval/report.json``), with ``files`` (written paths) and ``metrics``
        (flat ``{name: float}`` of the headline numbers, for experiment tracking).
    Raises:
        ConfigError: OUT missing or not a run folder, or bad ``num_images``/``steps``.
    """
    from . import config as C
    from .data import build_dataset
    from .pipeline import O2MKDPipeline
    from .teacher import load_teacher, sample_shape

    out = _check_run_folder(out)
    try:
        cfg = C.from_dict(json.loads((out / "config.json").read_text()))
    except json.JSONDecodeError:
        raise ConfigError(f"eval: {str(out / 'config.json')!r} is not valid JSON; is this a distill "
                          "run?") from None
    n = num_images if num_images is not None else cfg.eval.num_images
    steps = steps if steps is not None else cfg.eval.steps
    for key, v in (("--num-images", n), ("--steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"eval {key}: must be an integer >= 1, got {v!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from .teacher import teacher_kind

    if teacher_kind(cfg.teacher) == "stable_diffusion":
        return evaluate_sd_run(out, cfg, n, steps, latency_repeats=latency_repeats, device=dev)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 3)

    teacher, train_sched = load_teacher(cfg.teacher)
    teacher.to(dev)
    pipe = O2MKDPipeline.from_pretrained(out / "pipeline").to(dev)
    pipe.set_progress_bar_config(disable=True)
    multi = pipe.students.eval()
    shape = sample_shape(teacher, cfg.data.channels, cfg.data.resolution)
    if tuple(shape) != _pipe_shape(pipe):
        raise ConfigError(f"eval: teacher input {shape} differs from the students' {_pipe_shape(pipe)}; "
                          "the run's teacher spec no longer matches its pipeline")
    vr = list(cfg.data.value_range)
    dataset = build_dataset(cfg.data)
    seed = cfg.sampling.seed
    sched_cfg = train_sched.config
    lap("load_s")

    agree = teacher_agreement(multi, lambda x_t, t: (_eps(teacher(x_t, t)), None), train_sched, dataset,
                              multi.segments, agreement_samples, num_buckets, seed)
    per_seg = segment_summary(agree)
    overall = float((agree["mse"] * agree["n"]).sum() / agree["n"].sum())
    lap("agreement_s")
    traj = trajectory_fidelity(teacher, pipe, steps, n, seed, vr, scheduler_config=sched_cfg)
    lap("trajectory_s")

    space = fid_feature_space(cfg.eval.fid_weights, dev)
    ref = reference_images(dataset, min(num_reference, len(dataset)), vr, seed)
    fid = fid_kid(space, {"data": ref, "teacher": traj["teacher_images"], "o2mkd": traj["o2mkd_images"]},
                  [("teacher", "data"), ("o2mkd", "data"), ("o2mkd", "teacher")])
    lap("fid_s")
    cost = cost_report(teacher, multi, steps, sched_cfg, shape)
    lat = latency(teacher, pipe, steps, n, vr, scheduler_config=sched_cfg, repeats=latency_repeats, seed=seed)
    lap("cost_latency_s")

    ev = out / "eval"
    ev.mkdir(exist_ok=True)
    k = min(n, 16)
    diff = np.abs(traj["teacher_images"][:k] - traj["o2mkd_images"][:k])
    files = [
        save_grid([traj["teacher_images"][:k], traj["o2mkd_images"][:k], diff],
                  ["teacher", f"O2MKD (N={multi.num_students})", "|teacher - O2MKD|"],
                  ev / "samples_grid.png",
                  title=f"DDIM eta=0, {steps} steps, same noise; mean PSNR {traj['psnr_mean_db']:.1f} dB"),
        plot_agreement(agree, multi.segments.boundaries, ev / "agreement_vs_t.png"),
        plot_quality_vs_cost(
            [{"name": "teacher", "fid": fid["teacher_vs_data"]["fid"], "latency_s": lat["teacher_s"],
              "macs_per_image": cost["teacher"]["macs_per_run"]},
             {"name": f"O2MKD N={multi.num_students}", "fid": fid["o2mkd_vs_data"]["fid"],
              "latency_s": lat["o2mkd_s"], "macs_per_image": cost["o2mkd"]["macs_per_run"]}],
            space.backend, ev / "quality_vs_cost.png"),
    ]
    lap("plots_s")

    fid_note = (f"{n} generated vs {len(ref)} reference images; FID is biased upwards at small N (compare "
                "runs at equal N), KID is unbiased")
    report = {
        "run": str(out), "name": cfg.name, "num_segments": multi.num_students,
        "boundaries": list(multi.segments.boundaries),
        "settings": {"num_images": n, "steps": steps, "scheduler": "ddim", "eta": 0.0, "seed": seed,
                     "agreement_samples": agreement_samples, "num_buckets": num_buckets, "device": str(dev)},
        "agreement": {"overall_mse": overall, "per_segment": per_seg.to_dict("records"),
                      "per_bucket": agree.to_dict("records")},
        "trajectory": {**{key: v for key, v in traj.items() if key not in ("per_sample", "teacher_images",
                                                                          "o2mkd_images")},
                       "psnr_note": f"PSNR of images in [0, 1]; MSE == 0 is reported as the cap "
                                    f"({traj['psnr_cap_db']:g} dB)",
                       "per_sample": traj["per_sample"].to_dict("records")},
        "fid_backend": space.backend, "fid_backend_reason": space.reason,
        "fid": {"backend": space.backend, "comparable_to_published": space.comparable_to_published,
                "note": fid_note, **fid},
        "cost": cost, "latency": lat, "timings_s": timings,
    }
    metrics = {"agreement_mse": overall, "trajectory_mse": traj["mse_mean"],
               "trajectory_psnr_db": traj["psnr_mean_db"], "macs_ratio_run": cost["macs_ratio_run"],
               "params_ratio_total": cost["params_ratio_total"], "latency_speedup": lat["speedup"],
               "teacher_latency_s": lat["teacher_s"], "o2mkd_latency_s": lat["o2mkd_s"]}
    for row in per_seg.itertuples():
        metrics[f"agreement_mse_seg{row.segment:02d}"] = row.mse
    for pair, vals in fid.items():
        metrics[f"fid_{pair}"], metrics[f"kid_{pair}"] = vals["fid"], vals["kid"]
    report["metrics"] = {key: float(v) for key, v in metrics.items() if v is not None and math.isfinite(v)}
    nulls: dict[str, str] = {}
    report = _finite(report, "", nulls)
    for pair, vals in report["fid"].items():  # explicit reasons from fid_kid take precedence
        if isinstance(vals, dict) and "null_reason" in vals:
            for key in ("fid", "kid", "kid_std"):
                if vals.get(key) is None:
                    nulls[f"fid.{pair}.{key}"] = vals["null_reason"]
    if report["latency"]["speedup"] is None:
        nulls["latency.speedup"] = "O2MKD sampling time measured as 0 s; no ratio"
    report["null_reasons"] = nulls

    md = ev / "report.md"
    json_path = ev / "report.json"
    files = [md, json_path, *files]
    report["files"] = [str(f) for f in files]
    md.write_text(_markdown(report, per_seg, fid, cost, lat))
    json_path.write_text(json.dumps(report, indent=2))
    return report


def evaluate_sd_run(out: Path, cfg, num_images: int, steps: int, *, latency_repeats: int = 2,
                    device: torch.device | str = "cpu") -> dict:
    """The text-to-image evaluation of a distill run (:func:`o2mkd_ray.sd_eval.evaluate_sd`): teacher vs students
    on ``num_images`` prompts (``sampling.prompts``, then the data's captions) with the same noise and guidance;
    pixel MSE/PSNR, FID/KID students vs teacher, CLIP score (``eval.clip_model``), MACs and wall-time ratios.
    Writes ``OUT/eval/{samples.png, metrics.json, report.json}``."""
    from .assemble import sampling_prompts, teacher_sd_pipeline
    from .sd_eval import evaluate_sd  # samples both with a copy of the students' scheduler
    from .sd_pipeline import O2MKDStableDiffusionPipeline

    prompts = sampling_prompts(cfg, num_images)
    pipe = O2MKDStableDiffusionPipeline.from_pretrained(out / "pipeline").to(device)
    pipe.set_progress_bar_config(disable=True)
    teacher = teacher_sd_pipeline(cfg).to(device)
    ev = out / "eval"
    ev.mkdir(exist_ok=True)
    report = evaluate_sd(teacher, pipe, prompts, steps=steps, guidance_scale=cfg.sampling.guidance_scale,
                         negative_prompt=cfg.sampling.negative_prompt, seed=cfg.sampling.seed,
                         clip_model=cfg.eval.clip_model, fid_weights=cfg.eval.fid_weights, out_dir=ev,
                         latency_repeats=latency_repeats)
    report = {k: v for k, v in report.items() if k not in ("teacher_images", "student_images")}
    report.update(run=str(out), name=cfg.name, num_segments=pipe.unet.num_students,
                  boundaries=list(pipe.unet.config.boundaries))
    (ev / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


# ------------------------------------------------------------------------------------------------------------
# CLI hooks (wired into o2mkd_ray.cli)


def add_eval_parser(subparsers):
    """Adds ``eval OUT [--num-images N] [--steps S]`` to an argparse subparsers object; returns the parser."""
    p = subparsers.add_parser("eval", help="evaluate a distill run: agreement, trajectory fidelity, FID/KID, "
                                           "cost, latency (writes OUT/eval/)")
    p.add_argument("out", help="run folder written by `o2mkd-ray distill --out OUT`")
    p.add_argument("--num-images", type=int, default=None, help="images per model (default eval.num_images)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default eval.steps)")
    return p


def run_eval_cli(args) -> int:
    """Runs :func:`evaluate_run` for parsed ``eval`` arguments; prints headline metrics and files as JSON."""
    report = evaluate_run(args.out, num_images=args.num_images, steps=args.steps)
    print(json.dumps({"out": report["run"], "fid_backend": report["fid_backend"],
                      "metrics": report["metrics"], "files": report["files"]}, indent=2))
    return 0
