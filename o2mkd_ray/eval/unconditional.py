"""The evaluation of an unconditional run folder: teacher agreement per timestep, trajectory fidelity (same noise,
DDIM eta=0), FID/KID against the data and the teacher, cost of a DDIM run, latency; ``OUT/eval/report.json``,
``report.md`` and plots.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from o2mkd_ray.core.costs import sampler_timesteps
from o2mkd_ray.core.teacher import eps_of
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.eval.fid import fid_feature_space, fid_metrics, fid_section, reference_images
from o2mkd_ray.eval.measures import Stopwatch, cost_table
from o2mkd_ray.eval.metrics import (
    latency,
    pipe_sample_shape,
    segment_summary,
    teacher_agreement,
    trajectory_fidelity,
)
from o2mkd_ray.eval.report import (
    finish_report,
    markdown_report,
    plot_agreement,
    plot_quality_vs_cost,
    write_report,
)
from o2mkd_ray.eval.sampling import save_grid


@dataclass
class Options:
    """What :func:`evaluate_unconditional` measures, and how much (see
    :func:`o2mkd_ray.eval.evaluate.evaluate_run`)."""

    num_images: int
    steps: int
    agreement_samples: int
    num_buckets: int
    num_reference: int
    latency_repeats: int


@dataclass
class _Loaded:
    teacher: torch.nn.Module
    scheduler: object  # the teacher's training noise scheduler (add_noise, its config for DDIM)
    pipe: object  # O2MKDPipeline
    shape: tuple[int, int, int]
    dataset: object


def _load(out: Path, cfg, device: torch.device) -> _Loaded:
    from o2mkd_ray.core.teacher import load_teacher, sample_shape
    from o2mkd_ray.data.build import build_dataset
    from o2mkd_ray.pipelines.unconditional import O2MKDPipeline

    teacher, train_sched = load_teacher(cfg.teacher)
    teacher.to(device)
    pipe = O2MKDPipeline.from_pretrained(out / "pipeline").to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.students.eval()
    shape = sample_shape(teacher, cfg.data.channels, cfg.data.resolution)
    if tuple(shape) != pipe_sample_shape(pipe):
        raise ConfigError(f"eval: teacher input {shape} differs from the students' {pipe_sample_shape(pipe)}; "
                          "the run's teacher spec no longer matches its pipeline")
    return _Loaded(teacher, train_sched, pipe, tuple(shape), build_dataset(cfg.data))


def _measure(run: _Loaded, cfg, opt: Options, device, sw: Stopwatch) -> dict:
    """Every number of the report, each phase timed."""
    multi, seed, vr = run.pipe.students, cfg.sampling.seed, list(cfg.data.value_range)
    sched_cfg = run.scheduler.config
    teacher_fn = lambda x_t, t: (eps_of(run.teacher(x_t, t)), None)  # noqa: E731
    agree = teacher_agreement(multi, teacher_fn, run.scheduler, run.dataset, multi.segments,
                              opt.agreement_samples, opt.num_buckets, seed)
    sw.lap("agreement_s")
    traj = trajectory_fidelity(run.teacher, run.pipe, opt.steps, opt.num_images, seed, vr,
                               scheduler_config=sched_cfg)
    sw.lap("trajectory_s")
    space = fid_feature_space(cfg.eval.fid_weights, device)
    ref = reference_images(run.dataset, min(opt.num_reference, len(run.dataset)), vr, seed)
    note = (f"{opt.num_images} generated vs {len(ref)} reference images; FID is biased upwards at small N "
            "(compare runs at equal N), KID is unbiased")
    fid = fid_section(space, {"data": ref, "teacher": traj["teacher_images"], "o2mkd": traj["o2mkd_images"]},
                      [("teacher", "data"), ("o2mkd", "data"), ("o2mkd", "teacher")], note)
    sw.lap("fid_s")
    timesteps = sampler_timesteps("ddim", sched_cfg, opt.steps)
    cost = cost_table(run.teacher, [multi.student(k) for k in range(multi.num_students)],
                      multi.segments.boundaries, timesteps, run.shape, steps=opt.steps)
    lat = latency(run.teacher, run.pipe, opt.steps, opt.num_images, vr, scheduler_config=sched_cfg,
                  repeats=opt.latency_repeats, seed=seed)
    sw.lap("cost_latency_s")
    return {"agree": agree, "traj": traj, "fid": fid, "cost": cost, "latency": lat}


def _plots(ev: Path, m: dict, boundaries, steps: int, num_students: int) -> list[Path]:
    traj, cost, lat, fid = m["traj"], m["cost"], m["latency"], m["fid"]["fid"]
    k = min(len(traj["teacher_images"]), 16)
    t_img, s_img = traj["teacher_images"][:k], traj["o2mkd_images"][:k]
    return [
        save_grid([t_img, s_img, np.abs(t_img - s_img)],
                  ["teacher", f"O2MKD (N={num_students})", "|teacher - O2MKD|"], ev / "samples_grid.png",
                  title=f"DDIM eta=0, {steps} steps, same noise; mean PSNR {traj['psnr_mean_db']:.1f} dB"),
        plot_agreement(m["agree"], boundaries, ev / "agreement_vs_t.png"),
        plot_quality_vs_cost(
            [{"name": "teacher", "fid": fid["teacher_vs_data"]["fid"], "latency_s": lat["teacher_s"],
              "macs_per_image": cost["teacher"]["macs_per_run"]},
             {"name": f"O2MKD N={num_students}", "fid": fid["o2mkd_vs_data"]["fid"],
              "latency_s": lat["o2mkd_s"], "macs_per_image": cost["o2mkd"]["macs_per_run"]}],
            m["fid"]["fid_backend"], ev / "quality_vs_cost.png"),
    ]


def _assemble(out: Path, cfg, multi, m: dict, settings: dict, timings: dict) -> dict:
    """The finished report (:func:`~o2mkd_ray.eval.report.finish_report`) from the measurements."""
    agree, traj, cost, lat = m["agree"], m["traj"], m["cost"], m["latency"]
    per_seg = segment_summary(agree)
    overall = float((agree["mse"] * agree["n"]).sum() / agree["n"].sum())
    images = ("per_sample", "teacher_images", "o2mkd_images")
    report = {
        "run": str(out), "name": cfg.name, "num_segments": multi.num_students,
        "boundaries": list(multi.segments.boundaries), "settings": settings,
        "agreement": {"overall_mse": overall, "per_segment": per_seg.to_dict("records"),
                      "per_bucket": agree.to_dict("records")},
        "trajectory": {**{k: v for k, v in traj.items() if k not in images},
                       "psnr_note": f"PSNR of images in [0, 1]; MSE == 0 is reported as the cap "
                                    f"({traj['psnr_cap_db']:g} dB)",
                       "per_sample": traj["per_sample"].to_dict("records")},
        **m["fid"], "cost": cost, "latency": lat, "timings_s": timings,
    }
    metrics = {"agreement_mse": overall, "trajectory_mse": traj["mse_mean"],
               "trajectory_psnr_db": traj["psnr_mean_db"], "macs_ratio_run": cost["macs_ratio_run"],
               "params_ratio_total": cost["params_ratio_total"], "latency_speedup": lat["speedup"],
               "teacher_latency_s": lat["teacher_s"], "o2mkd_latency_s": lat["o2mkd_s"]}
    for row in per_seg.itertuples():
        metrics[f"agreement_mse_seg{row.segment:02d}"] = row.mse
    return finish_report(report, {**metrics, **fid_metrics(m["fid"])})


def evaluate_unconditional(out: Path, cfg, opt: Options, device: torch.device) -> dict:
    """Evaluates an unconditional run folder and writes ``OUT/eval/`` (see
    :func:`o2mkd_ray.eval.evaluate.evaluate_run`, its public entry).

    Args:
        out: the checked run folder.
        cfg: its config.
        opt: sizes of each measurement.
        device: where the models run.
    Returns:
        The report as written to ``OUT/eval/report.json``.
    """
    sw = Stopwatch()
    run = _load(out, cfg, device)
    sw.lap("load_s")
    m = _measure(run, cfg, opt, device, sw)
    ev = out / "eval"
    ev.mkdir(exist_ok=True)
    multi = run.pipe.students
    plots = _plots(ev, m, multi.segments.boundaries, opt.steps, multi.num_students)
    sw.lap("plots_s")
    settings = {"num_images": opt.num_images, "steps": opt.steps, "scheduler": "ddim", "eta": 0.0,
                "seed": cfg.sampling.seed, "agreement_samples": opt.agreement_samples,
                "num_buckets": opt.num_buckets, "device": str(device)}
    report = _assemble(out, cfg, multi, m, settings, sw.timings)
    return write_report(ev, report, plots, markdown=markdown_report(report))
