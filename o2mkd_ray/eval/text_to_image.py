"""Text-to-image evaluation of O2MKD Stable Diffusion students against their teacher.

:func:`evaluate_sd` samples the same prompts with the teacher's ``StableDiffusionPipeline`` and an
:class:`~o2mkd_ray.pipelines.stable_diffusion.O2MKDStableDiffusionPipeline` from the same per-image generators (so the same
initial latents) and the same scheduler class, and reports: pixel MSE/PSNR of the students' images against the
teacher's, FID/KID students vs teacher (in the feature space :func:`o2mkd_ray.eval.fid.fid_feature_space` picks,
labelled), CLIP score of both (:func:`clip_score`, given a local CLIP folder), UNet MACs per step and per
sampling run, and wall time per image. Plain torch/diffusers/transformers (no Ray, no MLflow).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from o2mkd_ray.core.atomic import write_json
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.eval.sampling import sample_images, sampling_state

PSNR_CAP_DB = 100.0  # PSNR of identical images (MSE 0) is +inf; reported as this cap (as in evaluation.py)


def _check_clip_folder(clip_model) -> Path:
    if clip_model is None or str(clip_model) == "":
        raise ConfigError("clip_model: give a local CLIP folder (CLIPModel + CLIPProcessor saved with "
                          "save_pretrained)")
    p = Path(clip_model).expanduser()
    if not p.is_dir():
        raise ConfigError(f"clip_model: {str(p)!r} is not a folder; give a local CLIP folder (CLIPModel + "
                          "CLIPProcessor saved with save_pretrained)")
    try:
        model_type = json.loads((p / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        model_type = None
    if model_type != "clip":
        raise ConfigError(f"clip_model: {str(p)!r} holds no CLIP model (config.json model_type "
                          f"{model_type!r}, expected 'clip')")
    return p.resolve()


@functools.lru_cache(maxsize=2)
def _load_clip(path: str, mtime: float, device: str):
    """``(CLIPModel, CLIPProcessor)`` from a local folder (cached; ``mtime`` of config.json invalidates)."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(path).to(device).eval()
        processor = CLIPProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"clip_model: could not load a CLIP model and processor from {path!r}: "
                          f"{first}") from None
    return model, processor


@torch.no_grad()
def clip_score(images: np.ndarray, prompts: list[str], clip_model: str | Path, *, batch_size: int = 32,
               device: str | torch.device = "cpu") -> float:
    """CLIP score of images against their prompts: mean over images of ``max(100 * cos(E_img, E_txt), 0)``.

    The per-pair definition of torchmetrics' ``CLIPScore`` (Hessel et al. 2021, with w = 100); torchmetrics
    clamps the mean rather than each pair, which agrees whenever no pair scores below 0 (real CLIP models on
    real prompts). Images are quantised to uint8 (as torchmetrics expects) and preprocessed by the folder's
    CLIP image processor (resize, centre crop, normalise); prompts are truncated to the tokenizer's length.

    Args:
        images: (N, H, W, 3) float in [0, 1].
        prompts: N prompts, ``prompts[i]`` the one image i was generated from.
        clip_model: a local folder with a transformers ``CLIPModel`` and ``CLIPProcessor`` (tokenizer + image
            processor), e.g. ``openai/clip-vit-large-patch14`` saved with ``save_pretrained``.
        batch_size: pairs per forward.
        device: where CLIP runs.
    Returns:
        The score in [0, 100].
    Raises:
        ConfigError: the folder is missing or holds no loadable CLIP model/processor.
        ValueError: images not (N, H, W, 3) or N != len(prompts).
    """
    path = _check_clip_folder(clip_model)
    images = np.asarray(images)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"clip_score: images must be (N, H, W, 3) in [0, 1], got shape {images.shape}")
    if len(images) != len(prompts):
        raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts; give one prompt per "
                         "image")
    if len(images) == 0:
        raise ValueError("clip_score: no images")
    mtime = (path / "config.json").stat().st_mtime
    model, processor = _load_clip(str(path), mtime, str(torch.device(device)))
    uint8 = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)  # (N, H, W, 3)
    scores = []
    for i in range(0, len(uint8), batch_size):
        inputs = processor(text=prompts[i:i + batch_size], images=list(uint8[i:i + batch_size]),
                           return_tensors="pt", padding=True, truncation=True)
        inputs = {k: v.to(model.device) for k, v in inputs.items()}
        # the joint forward's CLIPOutput holds both towers' projected embeddings (get_*_features return model
        # outputs rather than tensors in transformers 5)
        out = model(**inputs)
        img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)  # (B, P)
        txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)  # (B, P)
        scores.append((100.0 * (img * txt).sum(-1)).clamp_min(0).cpu())
    return float(torch.cat(scores).mean())


def _macs_report(teacher_pipe, student_pipe, scheduler, steps: int, cfg: bool) -> dict:
    """MACs of one UNet call at batch 1 (teacher and each student, ``encoder_hidden_states`` (1, L, D)), and
    of a whole sampling run per image on ``scheduler``'s timesteps (each step on its owner, x2 with CFG)."""
    from o2mkd_ray.core.costs import count_macs, count_params

    multi = student_pipe.unet
    L = int(teacher_pipe.tokenizer.model_max_length)
    D = int(teacher_pipe.text_encoder.config.hidden_size)

    def macs(model, timestep: int) -> int:
        p = next(model.parameters())
        ctx = torch.zeros(1, L, D, device=p.device, dtype=p.dtype)  # (1, L, D)
        return int(count_macs(model, None, timestep, encoder_hidden_states=ctx))

    scheduler.set_timesteps(steps)
    ts = [float(t) for t in scheduler.timesteps]  # one UNet call per entry (PNDM repeats one)
    owners = [multi.segments.owner(int(t)) for t in ts]
    per_call = 2 if cfg else 1
    t_macs = macs(teacher_pipe.unet, 500)
    students = []
    for k in range(multi.num_students):
        lo, hi = multi.segments.range(k)
        s = multi.student(k)
        m = macs(s, lo)
        n = owners.count(k)
        students.append({"segment": k, "t_lo": lo, "t_hi": hi, "params": int(count_params(s)),
                         "macs_per_step": m, "steps_in_run": n, "macs_in_run": m * n * per_call})
    run = sum(s["macs_in_run"] for s in students)
    teacher_run = t_macs * len(ts) * per_call
    return {
        "unet_calls_per_image": len(ts), "unet_batch_per_image": per_call,
        "note": "macs_per_step: one UNet call at batch 1 with encoder_hidden_states (1, L, D); a run per "
                "image calls the UNet once per scheduler timestep, on a batch of 2 with classifier-free "
                "guidance",
        "text_shape": [1, L, D],
        "teacher": {"params": int(count_params(teacher_pipe.unet)), "macs_per_step": t_macs,
                    "macs_per_run": teacher_run},
        "students": students,
        "o2mkd": {"macs_per_run": run, "mean_macs_per_step": run / max(1, len(ts) * per_call),
                  "params_total": sum(s["params"] for s in students)},
        "macs_ratio_run": run / max(1, teacher_run),  # step-weighted O2MKD / teacher on this schedule
    }


def _latency(teacher_pipe, student_pipe, sample_fn, repeats: int) -> dict:
    """Seconds per image of each pipeline: median of ``repeats`` interleaved runs (after the sampling, so
    warm)."""
    devices = {str(teacher_pipe._execution_device), str(student_pipe._execution_device)}
    cuda = any(d.startswith("cuda") for d in devices)
    sync = torch.cuda.synchronize if cuda and torch.cuda.is_available() else (lambda: None)

    def timed(pipe) -> float:
        sync()
        t0 = time.perf_counter()
        n = sample_fn(pipe)
        sync()
        return (time.perf_counter() - t0) / n

    t_runs, s_runs = [], []
    for _ in range(repeats):
        t_runs.append(timed(teacher_pipe))
        s_runs.append(timed(student_pipe))
    t_med, s_med = float(np.median(t_runs)), float(np.median(s_runs))
    return {"repeats": repeats, "teacher_s_per_image": t_med, "o2mkd_s_per_image": s_med,
            "speedup": t_med / s_med if s_med > 0 else None, "teacher_runs_s": t_runs, "o2mkd_runs_s": s_runs,
            "devices": sorted(devices), "torch_threads": torch.get_num_threads()}


def _psnr(mse: np.ndarray, cap: float = PSNR_CAP_DB) -> np.ndarray:
    with np.errstate(divide="ignore"):
        psnr = np.where(mse > 0, 10.0 * np.log10(1.0 / np.maximum(mse, 1e-300)), np.inf)  # peak 1.0 in [0, 1]
    return np.minimum(psnr, cap)


def evaluate_sd(teacher_pipe, student_pipe, prompts: list[str], *, steps: int = 20,
                guidance_scale: float = 7.5, negative_prompt: str | list[str] | None = None, seed: int = 0,
                clip_model: str | Path | None = None, fid_weights: str | None = None,
                out_dir: str | Path | None = None, latency_repeats: int = 2, batch_size: int = 8) -> dict:
    """Compares an O2MKD Stable Diffusion pipeline with its teacher on a list of prompts.

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
    from o2mkd_ray.eval.fid import fid_feature_space, fid_kid
    from o2mkd_ray.eval.report import finite_json
    from o2mkd_ray.eval.sampling import save_grid

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    if n == 0:
        raise ValueError("evaluate_sd: no prompts")
    for key, v, lo in (("steps", steps, 1), ("latency_repeats", latency_repeats, 0),
                       ("batch_size", batch_size, 1)):
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
        _check_clip_folder(clip_model)  # fail before minutes of sampling
    t_cfg, s_cfg = teacher_pipe.unet.config, student_pipe.unet.config
    t_lat = (t_cfg.in_channels, *((t_cfg.sample_size,) * 2 if isinstance(t_cfg.sample_size, int)
                                   else t_cfg.sample_size))
    s_lat = (s_cfg.in_channels, *((s_cfg.sample_size,) * 2 if isinstance(s_cfg.sample_size, int)
                                   else s_cfg.sample_size))
    if tuple(t_lat) != tuple(s_lat):
        raise ValueError(f"evaluate_sd: teacher latents {tuple(t_lat)} and students' {tuple(s_lat)} differ; "
                         "they cannot share initial noise")
    height, width = t_lat[1] * teacher_pipe.vae_scale_factor, t_lat[2] * teacher_pipe.vae_scale_factor
    # copies of the students' scheduler instance, not from_config(its config): a scheduler that
    # StableDiffusionPipeline.__init__ normalised (clip_sample=False) lists the key in _use_default_values, and
    # from_config would quietly restore the class default
    sched_cls = type(student_pipe.scheduler)
    fresh = lambda: copy.deepcopy(student_pipe.scheduler)  # noqa: E731
    kw = {"steps": steps, "guidance_scale": guidance_scale, "negative_prompt": negative_prompt, "seed": seed,
          "batch_size": batch_size, "height": height, "width": width}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    with sampling_state(teacher_pipe, fresh()), \
            sampling_state(student_pipe, fresh()):
        t_img = sample_images(teacher_pipe, prompts, **kw)
        timings["teacher_sampling_s"] = time.perf_counter() - t0
        s_img = sample_images(student_pipe, prompts, **kw)
        timings["student_sampling_s"] = time.perf_counter() - t0 - timings["teacher_sampling_s"]
        m = min(n, batch_size)
        lat = None
        if latency_repeats > 0:
            lat = _latency(teacher_pipe, student_pipe, lambda p: len(sample_images(p, prompts[:m], **kw)),
                           latency_repeats)

    mse = ((t_img.astype(np.float64) - s_img.astype(np.float64)) ** 2).reshape(n, -1).mean(1)
    psnr = _psnr(mse)
    pixel = {"mse_mean": float(mse.mean()), "mse_max": float(mse.max()), "psnr_mean_db": float(psnr.mean()),
             "psnr_min_db": float(psnr.min()), "psnr_cap_db": PSNR_CAP_DB,
             "per_image_mse": mse.tolist(), "note": "students' images vs the teacher's, [0, 1] pixels, same "
                                                   f"initial latents; MSE 0 reported as {PSNR_CAP_DB:g} dB"}

    space = fid_feature_space(fid_weights)
    fid = fid_kid(space, {"teacher": t_img, "o2mkd": s_img}, [("o2mkd", "teacher")])

    cfg_on = guidance_scale > 1 and student_pipe.unet.config.get("time_cond_proj_dim") is None
    cost = _macs_report(teacher_pipe, student_pipe, fresh(), steps, cfg_on)

    clip: dict = {}
    if clip_model is not None:
        clip = {"model": str(Path(clip_model).expanduser().resolve()),
                "teacher": clip_score(t_img, prompts, clip_model),
                "o2mkd": clip_score(s_img, prompts, clip_model)}
    timings["total_s"] = time.perf_counter() - t0

    files = []
    if out_dir is not None:
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        k = min(n, 16)
        labels = ["teacher", f"O2MKD (N={student_pipe.unet.num_students})"]
        title = (f"{sched_cls.__name__}, {steps} steps, guidance {guidance_scale:g}, same latents; mean PSNR "
                 f"{pixel['psnr_mean_db']:.1f} dB")
        files.append(save_grid([t_img[:k], s_img[:k]], labels, out / "samples.png", title=title))

    metrics = {"pixel_mse": pixel["mse_mean"], "pixel_psnr_db": pixel["psnr_mean_db"],
               "fid_o2mkd_vs_teacher": fid["o2mkd_vs_teacher"]["fid"],
               "kid_o2mkd_vs_teacher": fid["o2mkd_vs_teacher"]["kid"],
               "macs_ratio_run": cost["macs_ratio_run"],
               "teacher_macs_per_step": cost["teacher"]["macs_per_step"]}
    for s in cost["students"]:
        metrics[f"student{s['segment']:02d}_macs_per_step"] = s["macs_per_step"]
        ratio = s["macs_per_step"] / max(1, cost["teacher"]["macs_per_step"])
        metrics[f"student{s['segment']:02d}_macs_ratio"] = ratio
    if clip:
        metrics["clip_score_teacher"], metrics["clip_score_o2mkd"] = clip["teacher"], clip["o2mkd"]
    if lat is not None:
        metrics.update({"teacher_s_per_image": lat["teacher_s_per_image"],
                        "o2mkd_s_per_image": lat["o2mkd_s_per_image"], "latency_speedup": lat["speedup"]})

    nulls: dict[str, str] = {}
    report = {
        "settings": {"num_prompts": n, "steps": steps, "guidance_scale": guidance_scale,
                     "classifier_free_guidance": cfg_on, "scheduler": sched_cls.__name__, "seed": seed,
                     "negative_prompt": negative_prompt, "height": height, "width": width,
                     "batch_size": batch_size, "num_students": student_pipe.unet.num_students,
                     "boundaries": list(student_pipe.unet.config.boundaries), "prompts": prompts},
        "pixel": pixel,
        "fid_backend": space.backend, "fid_backend_reason": space.reason,
        "fid": {"backend": space.backend, "comparable_to_published": space.comparable_to_published,
                "note": f"{n} O2MKD vs {n} teacher images (same prompts and latents); FID is biased upwards "
                        "at small N, KID is unbiased", **fid},
        "clip": clip, "cost": cost, "latency": lat, "timings_s": timings,
    }
    if not clip:
        report["clip_score_skipped"] = "no clip_model given (a local CLIP folder); CLIP score not computed"
        nulls["clip"] = report["clip_score_skipped"]
    if lat is None:
        nulls["latency"] = "latency_repeats=0; not measured"
    report = finite_json(report, "", nulls)
    for pair, vals in report["fid"].items():
        if isinstance(vals, dict) and "null_reason" in vals:
            for key in ("fid", "kid", "kid_std"):
                if vals.get(key) is None:
                    nulls[f"fid.{pair}.{key}"] = vals["null_reason"]
    report["metrics"] = {key: float(v) for key, v in metrics.items() if v is not None and math.isfinite(v)}
    report["null_reasons"] = nulls
    if out_dir is not None:
        path = Path(out_dir).expanduser() / "metrics.json"
        files.append(path)
        report["files"] = [str(f) for f in files]
        write_json(path, report)
    else:
        report["files"] = []
    report["teacher_images"], report["student_images"] = t_img, s_img
    return report
