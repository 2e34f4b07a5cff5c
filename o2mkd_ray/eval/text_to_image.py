"""Text-to-image evaluation of O2MKD Stable Diffusion students against their teacher.

:func:`evaluate_sd` samples the same prompts with the teacher's ``StableDiffusionPipeline`` and an
:class:`~o2mkd_ray.pipelines.stable_diffusion.O2MKDStableDiffusionPipeline` from the same per-image
generators (so the same initial latents) and the same scheduler, and reports: pixel MSE/PSNR of the students'
images against the teacher's, FID/KID students vs teacher (in the feature space
:func:`o2mkd_ray.eval.fid.fid_feature_space` picks, labelled), CLIP score of both (:func:`clip_score`, given a
local CLIP folder), MACs per step and per sampling run (:mod:`o2mkd_ray.core.costs`, guidance as 2 passes), and
wall time per image. :func:`evaluate_sd_run` runs it on a distill run folder. Plain torch/diffusers/transformers
(no Ray, no MLflow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from o2mkd_ray.core.costs import guidance_passes, scheduler_timesteps
from o2mkd_ray.eval.clip import check_clip_folder, clip_score
from o2mkd_ray.eval.fid import fid_feature_space, fid_metrics, fid_section
from o2mkd_ray.eval.measures import (
    PSNR_CAP_DB,
    Stopwatch,
    cost_table,
    image_fidelity,
    paired_latency,
    sample_shape_of,
)
from o2mkd_ray.eval.report import finish_report, write_report
from o2mkd_ray.eval.sampling import sample_images, sampling_state, save_grid, scheduler_copy, students_of

__all__ = ["evaluate_sd", "evaluate_sd_run"]


def _checked_inputs(prompts, negative_prompt, clip_model, **ints: tuple[int, int]) -> tuple[list, list | None]:
    """``(prompts, negative prompts per prompt or None)``; ``ints`` maps a name to ``(value, minimum)``."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("evaluate_sd: no prompts")
    for key, (v, lo) in ints.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"evaluate_sd: {key} must be an integer >= {lo}, got {v!r}")
    if isinstance(negative_prompt, str):
        negative_prompt = [negative_prompt] * n
    elif negative_prompt is not None:
        negative_prompt = list(negative_prompt)
        if len(negative_prompt) != n:
            raise ValueError(f"evaluate_sd: {len(negative_prompt)} negative prompts for {n} prompts; give "
                             "one, or one per prompt")
    if clip_model is not None:
        check_clip_folder(clip_model)  # fail before minutes of sampling
    return prompts, negative_prompt


def _denoiser(teacher_pipe):
    """The teacher pipeline's denoiser: its UNet, or SD3's transformer."""
    return teacher_pipe.transformer if getattr(teacher_pipe, "transformer", None) is not None else teacher_pipe.unet


def _latent_shape(teacher_pipe, student_pipe) -> tuple[int, int, int]:
    t_lat, s_lat = sample_shape_of(_denoiser(teacher_pipe).config), sample_shape_of(students_of(student_pipe).config)
    if t_lat != s_lat:
        raise ValueError(f"evaluate_sd: teacher latents {t_lat} and students' {s_lat} differ; they cannot share "
                         "initial noise")
    return t_lat


def _sample_and_time(teacher_pipe, student_pipe, prompts: list[str], kw: dict, latency_repeats: int,
                     sw: Stopwatch) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """Both pipelines' images of ``prompts``, then seconds per image on the first batch (already warm)."""
    with sampling_state(teacher_pipe, scheduler_copy(student_pipe)), \
            sampling_state(student_pipe, scheduler_copy(student_pipe)):
        t_img = sample_images(teacher_pipe, prompts, **kw)
        sw.lap("teacher_sampling_s")
        s_img = sample_images(student_pipe, prompts, **kw)
        sw.lap("student_sampling_s")
        if latency_repeats == 0:
            return t_img, s_img, None
        first = prompts[:min(len(prompts), kw["batch_size"])]
        devices = sorted({str(teacher_pipe._execution_device), str(student_pipe._execution_device)})
        lat = paired_latency(lambda: sample_images(teacher_pipe, first, **kw),
                             lambda: sample_images(student_pipe, first, **kw), latency_repeats,
                             cuda=any(d.startswith("cuda") for d in devices), warmup=False, per=len(first),
                             unit="s_per_image")
    return t_img, s_img, {**lat, "devices": devices}


def _pixel(t_img: np.ndarray, s_img: np.ndarray) -> dict:
    pix = image_fidelity(t_img, s_img)
    keep = ("mse_mean", "mse_max", "psnr_mean_db", "psnr_min_db", "psnr_cap_db", "num_capped")
    return {**{k: pix[k] for k in keep}, "per_image_mse": pix["mse"].tolist(),
            "note": "students' images vs the teacher's, [0, 1] pixels, same initial latents; MSE 0 reported as "
                    f"{PSNR_CAP_DB:g} dB"}


def _clip(t_img: np.ndarray, s_img: np.ndarray, prompts: list[str], clip_model) -> dict:
    if clip_model is None:
        return {}
    return {"model": str(Path(clip_model).expanduser().resolve()),
            "teacher": clip_score(t_img, prompts, clip_model), "o2mkd": clip_score(s_img, prompts, clip_model)}


def _save(out_dir, report: dict, t_img: np.ndarray, s_img: np.ndarray) -> None:
    """``samples.png`` (teacher row, students row) and ``metrics.json`` into ``out_dir``."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    s, k = report["settings"], min(len(t_img), 16)
    title = (f"{s['scheduler']}, {s['steps']} steps, guidance {s['guidance_scale']:g}, same latents; mean PSNR "
             f"{report['pixel']['psnr_mean_db']:.1f} dB")
    grid = save_grid([t_img[:k], s_img[:k]], ["teacher", f"O2MKD (N={s['num_students']})"], out / "samples.png",
                     title=title)
    write_report(out, report, [grid], json_name="metrics.json")


def _cost(teacher_pipe, student_pipe, steps: int, passes: int) -> dict:
    """:func:`~o2mkd_ray.eval.measures.cost_table` on the students' scheduler, text of the tokenizer's length
    (SD3: the CLIP tokens, then the T5 ones, as its ``encode_prompt`` concatenates them)."""
    from o2mkd_ray.core.sd3 import sd3_text_length

    multi, teacher = students_of(student_pipe), _denoiser(teacher_pipe)
    sd3 = teacher.config.get("joint_attention_dim") is not None
    L = sd3_text_length(teacher_pipe) if sd3 else int(teacher_pipe.tokenizer.model_max_length)
    # SDXL: both text encoders' widths, concatenated; SD3: the joint attention width
    D = int(teacher.config.joint_attention_dim if sd3 else teacher.config.cross_attention_dim)
    table = cost_table(teacher, [multi.student(k) for k in range(multi.num_students)],
                       multi.segments.boundaries, scheduler_timesteps(student_pipe.scheduler, steps),
                       sample_shape_of(teacher.config), steps=steps, passes=passes, seq_len=L)
    note = ("macs_per_step: one denoiser call at batch 1 with encoder_hidden_states (1, L, D); a run per image "
            "calls it once per scheduler timestep, on a batch of 2 with classifier-free guidance")
    return {**table, "note": note, "text_shape": [1, L, D]}


def _metrics(pixel: dict, fid: dict, cost: dict, clip: dict, lat: dict | None) -> dict:
    t_macs = cost["teacher"]["macs_per_step"]
    metrics = {"pixel_mse": pixel["mse_mean"], "pixel_psnr_db": pixel["psnr_mean_db"], **fid_metrics(fid),
               "macs_ratio_run": cost["macs_ratio_run"], "teacher_macs_per_step": t_macs}
    for s in cost["students"]:
        metrics[f"student{s['segment']:02d}_macs_per_step"] = s["macs_per_step"]
        metrics[f"student{s['segment']:02d}_macs_ratio"] = s["macs_per_step"] / max(1, t_macs)
    if clip:
        metrics["clip_score_teacher"], metrics["clip_score_o2mkd"] = clip["teacher"], clip["o2mkd"]
    if lat is not None:
        metrics.update({"teacher_s_per_image": lat["teacher_s_per_image"],
                        "o2mkd_s_per_image": lat["o2mkd_s_per_image"], "latency_speedup": lat["speedup"]})
    return metrics


def _finished(settings: dict, pixel: dict, fid: dict, cost: dict, clip: dict, lat: dict | None,
              timings: dict) -> dict:
    """The report (:func:`~o2mkd_ray.eval.report.finish_report`), skipped measurements given their reasons."""
    report = {"settings": settings, "pixel": pixel, **fid, "clip": clip, "cost": cost, "latency": lat,
              "timings_s": timings}
    reasons = {} if lat is not None else {"latency": "latency_repeats=0; not measured"}
    if not clip:
        report["clip_score_skipped"] = reasons["clip"] = ("no clip_model given (a local CLIP folder); CLIP "
                                                          "score not computed")
    report = finish_report(report, _metrics(pixel, fid, cost, clip, lat), reasons)
    report["files"] = []
    return report


def evaluate_sd(teacher_pipe, student_pipe, prompts: list[str], *, steps: int = 20,
                guidance_scale: float = 7.5, negative_prompt: str | list[str] | None = None, seed: int = 0,
                clip_model: str | Path | None = None, fid_weights: str | None = None,
                out_dir: str | Path | None = None, latency_repeats: int = 2, batch_size: int = 8) -> dict:
    """Compares an O2MKD Stable Diffusion pipeline with its teacher on a list of prompts.

    Long by its docstring (about 35 lines); the body is a sequence of calls to the shared evaluation pieces.

    Both pipelines sample ``prompts`` with a fresh scheduler of the student pipeline's scheduler class and
    config (their own schedulers are restored afterwards), ``steps`` steps, the same guidance, and one
    generator per image seeded ``seed + i``, so image i starts from the same latents (B, C_lat, h, w) in both.

    Args:
        teacher_pipe: the teacher ``StableDiffusionPipeline``.
        student_pipe: an :class:`~o2mkd_ray.pipelines.stable_diffusion.O2MKDStableDiffusionPipeline` (same latent shape).
        prompts: N prompts; image i of each pipeline is generated from ``prompts[i]``.
        steps: ``num_inference_steps`` of both.
        guidance_scale: classifier-free guidance weight of both (> 1: two UNet branches per step).
        negative_prompt: one for all prompts, or one per prompt.
        seed: image i uses ``torch.Generator().manual_seed(seed + i)``.
        clip_model: a local CLIP folder for :func:`clip_score`; None skips it (``clip_score_skipped`` says
            so).
        fid_weights: local Inception weights for FID/KID; None reads ``$O2MKD_FID_WEIGHTS``, else the
            random-network fallback (see :mod:`o2mkd_ray.eval.fid`; ``fid_backend`` labels the space).
        out_dir: where to write ``samples.png`` (teacher row vs students row) and ``metrics.json``.
        latency_repeats: interleaved timed runs per pipeline on the first ``min(N, batch_size)`` prompts;
            0 skips latency.
        batch_size: prompts per pipeline call.
    Returns:
        ``{"metrics": {name: float}, "settings", "pixel", "fid", "fid_backend", "fid_backend_reason",
        "clip", "cost", "latency", "null_reasons", "files", "teacher_images", "student_images"}``; images are
        (N, H, W, 3) float in [0, 1]. ``metrics.json`` holds all but the images.
    Raises:
        ConfigError: ``clip_model`` given but not a loadable CLIP folder (checked before any sampling).
        ValueError: no prompts, bad ``steps``/``latency_repeats``/``negative_prompt``, or pipelines whose
            latents differ in shape.
    """
    prompts, negative_prompt = _checked_inputs(prompts, negative_prompt, clip_model, steps=(steps, 1),
                                               latency_repeats=(latency_repeats, 0), batch_size=(batch_size, 1))
    n, (_, h, w) = len(prompts), _latent_shape(teacher_pipe, student_pipe)
    kw = {"steps": steps, "guidance_scale": guidance_scale, "negative_prompt": negative_prompt, "seed": seed,
          "batch_size": batch_size, "height": h * teacher_pipe.vae_scale_factor,
          "width": w * teacher_pipe.vae_scale_factor}
    sw = Stopwatch()
    t_img, s_img, lat = _sample_and_time(teacher_pipe, student_pipe, prompts, kw, latency_repeats, sw)
    pixel = _pixel(t_img, s_img)
    fid = fid_section(fid_feature_space(fid_weights), {"teacher": t_img, "o2mkd": s_img}, [("o2mkd", "teacher")],
                      f"{n} O2MKD vs {n} teacher images (same prompts and latents); FID is biased upwards at "
                      "small N, KID is unbiased")
    passes = guidance_passes(guidance_scale, students_of(student_pipe).config)
    cost = _cost(teacher_pipe, student_pipe, steps, passes)
    clip = _clip(t_img, s_img, prompts, clip_model)
    sw.timings["total_s"] = sw.total()
    settings = {"num_prompts": n, "steps": steps, "guidance_scale": guidance_scale,
                "classifier_free_guidance": passes == 2, "scheduler": type(student_pipe.scheduler).__name__,
                "seed": seed, "negative_prompt": negative_prompt, "height": kw["height"], "width": kw["width"],
                "batch_size": batch_size, "num_students": students_of(student_pipe).num_students,
                "boundaries": list(students_of(student_pipe).config.boundaries), "prompts": prompts}
    report = _finished(settings, pixel, fid, cost, clip, lat, sw.timings)
    if out_dir is not None:
        _save(out_dir, report, t_img, s_img)
    report["teacher_images"], report["student_images"] = t_img, s_img
    return report


def evaluate_sd_run(out: Path, cfg, num_images: int, steps: int, *, latency_repeats: int = 2,
                    device="cpu") -> dict:
    """The text-to-image evaluation of a distill run folder (:func:`evaluate_sd`): teacher vs students on
    ``num_images`` prompts (``sampling.prompts``, then the data's captions) with the same noise and guidance
    (``sampling.*``), CLIP score with ``eval.clip_model``.

    Args:
        out: the checked run folder.
        cfg: its config.
        num_images: prompts (one image each per pipeline).
        steps: sampling steps of both pipelines.
        latency_repeats: see :func:`evaluate_sd`.
        device: where the pipelines run.
    Returns:
        The report as written to ``OUT/eval/report.json`` (also ``metrics.json`` and ``samples.png``).
    """
    from o2mkd_ray.eval.sampling import sampling_prompts
    from o2mkd_ray.pipelines.build import saved_pipeline_class, teacher_sd_pipeline

    prompts = sampling_prompts(cfg, num_images)
    pipe = saved_pipeline_class(out / "pipeline").from_pretrained(out / "pipeline").to(device)
    pipe.set_progress_bar_config(disable=True)
    teacher = teacher_sd_pipeline(cfg).to(device)
    ev = out / "eval"
    ev.mkdir(exist_ok=True)
    report = evaluate_sd(teacher, pipe, prompts, steps=steps, guidance_scale=cfg.sampling.guidance_scale,
                         negative_prompt=cfg.sampling.negative_prompt, seed=cfg.sampling.seed,
                         clip_model=cfg.eval.clip_model, fid_weights=cfg.eval.fid_weights, out_dir=ev,
                         latency_repeats=latency_repeats)
    report = {k: v for k, v in report.items() if k not in ("teacher_images", "student_images")}
    report.update(run=str(out), name=cfg.name, num_segments=students_of(pipe).num_students,
                  boundaries=list(students_of(pipe).config.boundaries))
    return write_report(ev, report, report["files"])
