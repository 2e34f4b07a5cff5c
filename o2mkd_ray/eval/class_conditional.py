"""Evaluation of O2MKD DiT students against their class-conditional teacher.

:func:`evaluate_dit_run` reports, for a distill run folder: the students' agreement with the teacher (output MSE,
the whole learned-sigma output, on the training forward process, :func:`~o2mkd_ray.eval.metrics.teacher_agreement`)
on held-out class labels, next to the same figure for untrained students (the teacher-initialised ones the run
started from), so the gain of distillation is read off one report; the pixel error of the students' images
against the teacher's (``DiTPipeline``, same class labels, noise, guidance and scheduler) and the FID/KID proxy of
the students' images against the teacher's (:mod:`o2mkd_ray.eval.fid`, backend labelled); the MACs per step and
per sampling run (:mod:`o2mkd_ray.core.costs`, guidance as 2 passes); and the wall time per image of both pipelines
(interleaved repetitions). Plain torch/diffusers (no Ray, no MLflow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from o2mkd_ray.core.costs import guidance_passes, scheduler_timesteps
from o2mkd_ray.eval.fid import fid_feature_space, fid_metrics, fid_section
from o2mkd_ray.eval.measures import cost_table, image_fidelity, paired_latency, sample_shape_of
from o2mkd_ray.eval.metrics import segment_summary, teacher_agreement
from o2mkd_ray.eval.report import finish_report, write_report
from o2mkd_ray.eval.sampling import sampling_class_labels, save_grid, scheduler_copy

__all__ = ["class_agreement", "evaluate_dit_run", "held_out_labels"]


def held_out_labels(cond_data: dict, num_classes: int, n: int, seed: int) -> torch.Tensor:
    """``n`` random class labels ``(n,)`` none of which the run's training data has (when any class is left)."""
    seen = set(np.asarray(cond_data["class_labels"]).tolist())
    pool = torch.tensor([k for k in range(num_classes) if k not in seen] or list(range(num_classes)))
    g = torch.Generator().manual_seed(seed)
    return pool[torch.randint(0, len(pool), (n,), generator=g)]


def class_agreement(multi, teacher, scheduler, latents: torch.Tensor, labels: torch.Tensor, num_samples: int = 64,
                    seed: int = 0) -> dict:
    """Student-vs-teacher output MSE over ``[0, T)`` on ``latents`` paired with ``labels``.

    Args:
        multi: a :class:`~o2mkd_ray.pipelines.multi_transformer.MultiStudentTransformer` of DiT students.
        teacher: the teacher ``DiTTransformer2DModel``.
        latents: x_0 ``(N, C, h, w)``; labels: ``(N,)`` class labels given to both.
    Returns:
        ``{"mse": mean over samples, "per_segment": [{"segment", "t_lo", "t_hi", "n", "mse", ...}]}``.
    """
    data = TensorDataset(latents.float(), labels.long())
    df = teacher_agreement(multi, teacher, scheduler, data, num_samples=num_samples, num_buckets=10, seed=seed,
                           batch_size=32)
    per = segment_summary(df)
    return {"mse": float((per["mse"] * per["n"]).sum() / per["n"].sum()), "per_segment": per.to_dict("records")}


@torch.no_grad()
def _sample(p, labels: list[int], steps: int, guidance: float, seed: int) -> np.ndarray:
    """One pipeline's images ``(N, H, W, 3)`` of ``labels``, the noise from ``seed``."""
    return p(class_labels=labels, guidance_scale=guidance, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(seed), output_type="np").images


def _samples(teacher_pipe, pipe, labels: list[int], steps: int, guidance: float, seed: int):
    """Both pipelines' images ``(N, H, W, 3)`` of ``labels`` from the same noise and a copy of one scheduler."""
    imgs = []
    for p in (teacher_pipe, pipe):
        p.scheduler = scheduler_copy(pipe)
        p.set_progress_bar_config(disable=True)
        imgs.append(_sample(p, labels, steps, guidance, seed))
    return imgs


def evaluate_dit_run(out: Path, cfg, num_images: int, steps: int, *, agreement_samples: int = 64,
                     latency_repeats: int = 2, device="cpu") -> dict:
    """The DiT evaluation of a distill run folder (see the module docstring), written to ``OUT/eval/``.

    Args:
        out: the checked run folder; cfg: its config.
        num_images: images per pipeline (class labels ``0, 1, ...``).
        steps: sampling steps of both pipelines.
        agreement_samples: ``(x_0, ε, t)`` draws of each agreement figure.
        latency_repeats: interleaved timed sampling runs per pipeline (0: latency not measured).
        device: where the models run.
    Returns:
        The report as written to ``OUT/eval/report.json`` (``metrics``: ``agreement_mse``,
        ``agreement_mse_untrained``, ``pixel_mse``, ``macs_ratio_run``, ``fid_o2mkd_vs_teacher``,
        ``kid_o2mkd_vs_teacher`` and, when timed, ``teacher_s_per_image``, ``o2mkd_s_per_image``,
        ``latency_speedup``).
    """
    from diffusers import DDPMScheduler

    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.distill.run_folder import load_cond_data
    from o2mkd_ray.pipelines.build import saved_pipeline_class, teacher_dit_pipeline
    from o2mkd_ray.pipelines.multi_transformer import MultiStudentTransformer

    pipe = saved_pipeline_class(out / "pipeline").from_pretrained(out / "pipeline").to(device)
    teacher_pipe = teacher_dit_pipeline(cfg).to(device)
    teacher, multi = teacher_pipe.transformer, pipe.transformer
    num_classes = int(teacher.config.num_embeds_ada_norm)
    train_sched = DDPMScheduler.from_config(teacher_pipe.scheduler.config)
    cond = load_cond_data(cfg, out, teacher, train_sched, None)  # the run's cached latents
    latents = torch.from_numpy(np.array(cond["latents"]))
    labels = held_out_labels(cond, num_classes, len(latents), cfg.sampling.seed + 1)
    trained = class_agreement(multi, teacher, train_sched, latents, labels, agreement_samples, cfg.sampling.seed)
    fresh = MultiStudentTransformer(build_students(cfg, teacher, multi.num_students),
                                    boundaries=list(multi.config.boundaries)).to(device)
    untrained = class_agreement(fresh, teacher, train_sched, latents, labels, agreement_samples, cfg.sampling.seed)
    class_labels = sampling_class_labels(cfg, num_classes, num_images)
    t_img, s_img = _samples(teacher_pipe, pipe, class_labels, steps, cfg.sampling.guidance_scale, cfg.sampling.seed)
    pixel = image_fidelity(t_img, s_img)
    fid = fid_section(fid_feature_space(cfg.eval.fid_weights), {"teacher": t_img, "o2mkd": s_img},
                      [("o2mkd", "teacher")], f"{len(t_img)} O2MKD vs {len(t_img)} teacher images (same class labels "
                      "and noise); FID is biased upwards at small N, KID is unbiased")
    lat = None
    if latency_repeats > 0:
        args = (class_labels, steps, cfg.sampling.guidance_scale, cfg.sampling.seed)
        lat = paired_latency(lambda: _sample(teacher_pipe, *args), lambda: _sample(pipe, *args), latency_repeats,
                             cuda=torch.device(device).type == "cuda", warmup=False, per=len(class_labels),
                             unit="s_per_image")
    ev = out / "eval"
    ev.mkdir(exist_ok=True)
    grid = save_grid([t_img, s_img], ["teacher", f"O2MKD students (N={multi.num_students})"], ev / "samples.png",
                     title=f"{steps} steps, guidance {cfg.sampling.guidance_scale}, same noise")
    shape = sample_shape_of(teacher.config)
    cost = cost_table(teacher, [multi.student(k) for k in range(multi.num_students)], multi.config.boundaries,
                      scheduler_timesteps(pipe.scheduler, steps), shape, steps=steps,
                      passes=guidance_passes(cfg.sampling.guidance_scale, teacher.config))
    report = {"run": str(out), "name": cfg.name, "num_segments": multi.num_students,
              "boundaries": list(multi.config.boundaries), "agreement": trained, "agreement_untrained": untrained,
              "held_out_labels": labels.tolist(), "pixel": pixel, **fid, "cost": cost, "latency": lat,
              "settings": {"steps": steps, "num_images": num_images, "class_labels": class_labels,
                           "guidance_scale": cfg.sampling.guidance_scale, "seed": cfg.sampling.seed}}
    metrics = {"agreement_mse": trained["mse"], "agreement_mse_untrained": untrained["mse"],
               "pixel_mse": pixel["mse_mean"], "macs_ratio_run": cost["macs_ratio_run"], **fid_metrics(fid)}
    if lat is not None:
        metrics.update(teacher_s_per_image=lat["teacher_s_per_image"], o2mkd_s_per_image=lat["o2mkd_s_per_image"],
                       latency_speedup=lat["speedup"])
    reasons = {} if lat is not None else {"latency": "latency_repeats=0; not measured"}
    return write_report(ev, finish_report(report, metrics, reasons), [grid])
