"""``evaluate_run(OUT)``: the evaluation of a distill run, for unconditional and text-to-image runs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from o2mkd_ray.core.atomic import write_json, write_text
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.eval.fid import REFERENCE_IMAGES, fid_feature_space, fid_kid, reference_images
from o2mkd_ray.eval.metrics import (
    cost_report,
    eps_of,
    latency,
    pipe_sample_shape,
    segment_summary,
    teacher_agreement,
    trajectory_fidelity,
)
from o2mkd_ray.eval.report import finite_json, markdown_report, plot_agreement, plot_quality_vs_cost
from o2mkd_ray.eval.sampling import save_grid


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
    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.core.teacher import load_teacher, sample_shape
    from o2mkd_ray.data.build import build_dataset
    from o2mkd_ray.pipelines.unconditional import O2MKDPipeline

    out = _check_run_folder(out)
    try:
        cfg = from_dict(json.loads((out / "config.json").read_text()))
    except json.JSONDecodeError:
        raise ConfigError(f"eval: {str(out / 'config.json')!r} is not valid JSON; is this a distill "
                          "run?") from None
    n = num_images if num_images is not None else cfg.eval.num_images
    steps = steps if steps is not None else cfg.eval.steps
    for key, v in (("--num-images", n), ("--steps", steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"eval {key}: must be an integer >= 1, got {v!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from o2mkd_ray.core.teacher import teacher_kind

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
    if tuple(shape) != pipe_sample_shape(pipe):
        raise ConfigError(f"eval: teacher input {shape} differs from the students' {pipe_sample_shape(pipe)}; "
                          "the run's teacher spec no longer matches its pipeline")
    vr = list(cfg.data.value_range)
    dataset = build_dataset(cfg.data)
    seed = cfg.sampling.seed
    sched_cfg = train_sched.config
    lap("load_s")

    agree = teacher_agreement(multi, lambda x_t, t: (eps_of(teacher(x_t, t)), None), train_sched, dataset,
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
    report = finite_json(report, "", nulls)
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
    write_text(md, markdown_report(report, per_seg, fid, cost, lat))
    write_json(json_path, report)
    return report


def evaluate_sd_run(out: Path, cfg, num_images: int, steps: int, *, latency_repeats: int = 2,
                    device: torch.device | str = "cpu") -> dict:
    """The text-to-image evaluation of a distill run (:func:`o2mkd_ray.eval.text_to_image.evaluate_sd`): teacher vs students
    on ``num_images`` prompts (``sampling.prompts``, then the data's captions) with the same noise and guidance;
    pixel MSE/PSNR, FID/KID students vs teacher, CLIP score (``eval.clip_model``), MACs and wall-time ratios.
    Writes ``OUT/eval/{samples.png, metrics.json, report.json}``."""
    from o2mkd_ray.eval.sampling import sampling_prompts
    from o2mkd_ray.eval.text_to_image import evaluate_sd
    from o2mkd_ray.pipelines.build import teacher_sd_pipeline
    from o2mkd_ray.pipelines.stable_diffusion import O2MKDStableDiffusionPipeline

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
    write_json(ev / "report.json", report)
    return report
