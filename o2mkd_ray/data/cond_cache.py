"""The text-to-image training data: x_0 latents and text embeddings, computed once and cached per run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from o2mkd_ray.core.atomic import replace_file
from o2mkd_ray.core.conditioning import as_dict, cond_batch, cond_cat, cond_map, cond_slice, item_names
from o2mkd_ray.core.sd import encode_images, encode_prompts, load_sd_components, vae_scale_factor
from o2mkd_ray.errors import ConfigError


def cond_cache_key(cfg) -> str:
    """What the cached latents/embeddings depend on (teacher, captions source, synthesis settings, seed)."""
    import hashlib

    d = cfg.to_dict()
    keep = {"teacher": {k: d["teacher"][k] for k in ("pretrained", "subfolder", "kind")},
            "data": {k: d["data"][k] for k in ("kind", "name", "path", "split", "image_key", "caption_key",
                                              "image_root", "max_prompts", "synth_steps", "synth_guidance")},
            "seed": d["train"]["seed"]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def synthesize_latents(teacher, scheduler_config, cond, uncond, shape, steps: int, guidance: float, seed: int,
                       batch_size: int = 16) -> torch.Tensor:
    """Data-free x_0: the teacher's own samples for each caption (DDIM, or the flow-matching Euler sampler of a
    flow-matching teacher; classifier-free guidance), in latent space.

    The scheduler is built from ``scheduler_config``, so it reads the teacher's output as the config's
    ``prediction_type`` says (ε, v or x_0; a velocity for flow matching); guidance mixes raw outputs, which is linear in any of them, as
    diffusers' ``StableDiffusionPipeline`` does.

    Args:
        teacher: the teacher callable ``teacher(x_t, t, features=False, cond=...) -> (out, _)`` (in-process or the
            Ray teacher service, so the sampling runs where the teacher lives).
        cond: the N captions' condition (text embeddings ``(N, L, D)``, or SDXL's dict,
            :mod:`o2mkd_ray.core.conditioning`); ``uncond``: the empty prompt's, batch 1, same form.
        shape: latent shape ``(C, h, w)``.
    Returns:
        ``(N, C, h, w)`` latents.
    """
    from o2mkd_ray.core.flow_matching import synthesis_scheduler

    sched = synthesis_scheduler(scheduler_config)
    flow = not hasattr(sched, "alphas_cumprod")  # flow matching: the transformer takes float t = T * sigma
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, cond_batch(cond), batch_size):
        c = cond_slice(cond, i, i + batch_size)
        b = cond_batch(c)
        x = torch.randn((b, *shape), generator=g) * getattr(sched, "init_noise_sigma", 1.0)  # flow matching: 1
        sched.set_timesteps(steps)
        if guidance > 1:
            c = cond_cat([cond_map(uncond, lambda u, b=b: u.expand(b, *u.shape[1:])), c])
        for t in sched.timesteps:
            x_in = torch.cat([x, x]) if guidance > 1 else x
            t_b = torch.full((x_in.shape[0],), float(t) if flow else int(t))
            eps, _ = teacher(x_in if flow else sched.scale_model_input(x_in, t), t_b, features=False, cond=c)
            if guidance > 1:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            # a learned-sigma teacher (DiT) outputs the prediction, then the variance: the step takes the first part,
            # as DiTPipeline does
            x = sched.step(eps[:, :shape[0]], t, x).prev_sample
        out.append(x.float())
    return torch.cat(out)


# Cached array name -> (which condition, conditioning name): SD 1.x/2.x has "embeds" and "uncond" only; DiT's
# class data (o2mkd_ray.data.class_data) the last two only.
ARRAYS = {"embeds": ("cond", "encoder_hidden_states"), "pooled": ("cond", "text_embeds"),
          "time_ids": ("cond", "time_ids"), "uncond": ("uncond", "encoder_hidden_states"),
          "uncond_pooled": ("uncond", "text_embeds"), "uncond_time_ids": ("uncond", "time_ids"),
          "pooled_projections": ("cond", "pooled_projections"),
          "uncond_pooled_projections": ("uncond", "pooled_projections"),
          "class_labels": ("cond", "class_labels"), "uncond_class_labels": ("uncond", "class_labels")}


def _encode_captions(cfg, prompts: list[str], size: int, device, denoiser=None):
    """``(cond, uncond, vae)``: the captions' and the empty prompt's conditions as the teacher's pipeline builds
    them (SD: a text embedding tensor; SDXL: a dict with pooled embeddings and time ids; SD3: a dict with pooled
    projections, its pipeline built around the loaded ``denoiser``), and the teacher's VAE."""
    from o2mkd_ray.core.teacher import teacher_kind

    spec = cfg.teacher.pretrained
    if teacher_kind(cfg.teacher) == "sd3":
        from o2mkd_ray.core.sd3 import encode_sd3_prompts, load_sd3_components

        pipe = load_sd3_components(spec, denoiser)
        for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if enc is not None:
                enc.to(device)
        cond, uncond = encode_sd3_prompts(pipe, prompts)
        return cond, uncond, pipe.vae
    if teacher_kind(cfg.teacher) == "stable_diffusion_xl":
        from o2mkd_ray.core.sdxl import encode_sdxl_prompts, load_sdxl_components

        pipe = load_sdxl_components(spec)
        pipe.text_encoder.to(device)
        pipe.text_encoder_2.to(device)
        res = size * vae_scale_factor(pipe.vae)
        cond, uncond = encode_sdxl_prompts(pipe, prompts, res, res)
        return cond, uncond, pipe.vae
    parts = load_sd_components(spec)
    parts["text_encoder"].to(device)
    return (encode_prompts(parts["tokenizer"], parts["text_encoder"], prompts),
            encode_prompts(parts["tokenizer"], parts["text_encoder"], [""]), parts["vae"])


def _arrays(cond, uncond) -> dict:
    """The conditions as named cache arrays (:data:`ARRAYS`)."""
    both = {"cond": as_dict(cond), "uncond": as_dict(uncond)}
    return {n: both[which][name].contiguous() for n, (which, name) in ARRAYS.items() if name in both[which]}


def _view(a) -> torch.Tensor:
    """A tensor sharing ``a``'s memory (arrays from Ray's object store are read-only: torch warns, nothing writes)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def conditions(cond_data: dict):
    """``(cond, uncond)`` torch conditions (:mod:`o2mkd_ray.core.conditioning`) of a cache's arrays: the N captions'
    and the empty prompt's (batch 1). Zero-copy views of the arrays."""
    parts: dict = {"cond": {}, "uncond": {}}
    for n, (which, name) in ARRAYS.items():
        if n in cond_data:
            parts[which][name] = _view(cond_data[n])
    simple = lambda d: d["encoder_hidden_states"] if list(d) == ["encoder_hidden_states"] else d  # noqa: E731 - SD
    return simple(parts["cond"]), simple(parts["uncond"])


def build_cond_data(cfg, teacher_unet, scheduler_config, teacher=None, cache_dir=None, log=print) -> dict:
    """Caption latents and conditions for a text-to-image teacher (SD 1.x/2.x, SDXL), cached in ``cache_dir``.

    Captions come from ``data.*`` (:func:`o2mkd_ray.data.captions.read_captions`); their conditions from the
    teacher's text encoder(s), exactly as its pipeline encodes prompts (SDXL: both encoders, the pooled embedding
    and the micro-conditioning time ids for the teacher's resolution). With images, x_0 are VAE latents of the
    images (resized to the teacher's resolution); without, the teacher samples one latent per caption
    (``data.synth_steps`` DDIM steps, flow-matching Euler ones for SD3; guidance ``data.synth_guidance``).

    Args:
        teacher_unet: the teacher UNet2DConditionModel (its latent shape; samples in-process if ``teacher`` is None).
        scheduler_config: the teacher's noise schedule.
        teacher: optional teacher callable (e.g. the Ray teacher service) for the synthesis.
        cache_dir: a folder; the cache file is reused when its key matches, written atomically otherwise.
    Returns:
        float32 numpy arrays ``"latents"`` (N, C, h, w), ``"embeds"`` (N, L, D), ``"uncond"`` (1, L, D), for SDXL
        also ``"pooled"`` (N, P), ``"uncond_pooled"`` (1, P), ``"time_ids"`` (N, 6), ``"uncond_time_ids"``
        (1, 6) (:data:`ARRAYS`; :func:`conditions` turns them into conditions), and ``"prompts"``: the N captions.
    """

    from safetensors.torch import save_file

    from o2mkd_ray.core.flow_matching import synthesis_scheduler
    from o2mkd_ray.data.captions import read_captions

    key = cond_cache_key(cfg)
    path = Path(cache_dir) / f"cond-{key}.safetensors" if cache_dir else None
    cached = _read_cache(path, key, log) if path is not None else None
    if cached is not None:
        return cached
    df = read_captions(cfg.data)
    if df.empty:
        raise ConfigError("data: no captions found; check data.path / data.name and data.caption_key")
    prompts = df["caption"].tolist()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the driver's GPU when it has one
    c = teacher_unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    shape = (c.in_channels, size, size)
    cond, uncond, vae = _encode_captions(cfg, prompts, size, device, teacher_unet)
    if "image" in df:
        latents = _encode_caption_images(list(df["image"]), vae.to(device), size, cfg.train.seed, log)
    else:
        from o2mkd_ray.core.teacher import TeacherFn

        log(f"text-to-image data: no images; sampling {len(prompts)} latents with the teacher "
            f"({cfg.data.synth_steps} {type(synthesis_scheduler(scheduler_config)).__name__} steps, guidance "
            f"{cfg.data.synth_guidance})")
        latents = synthesize_latents(teacher or TeacherFn(teacher_unet, []), scheduler_config, cond, uncond, shape,
                                     cfg.data.synth_steps, cfg.data.synth_guidance, cfg.train.seed)
    out = {"latents": latents.float().contiguous(), **_arrays(cond, uncond)}
    if path is not None:
        with replace_file(path) as tmp:
            save_file(out, str(tmp), metadata={"key": key, "prompts": json.dumps(prompts)})
    return {**{n: v.numpy() for n, v in out.items()}, "prompts": prompts}


def _read_cache(path: Path, key: str, log) -> dict | None:
    """The cached arrays when ``path`` holds the cache for ``key``; else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        log(f"text-to-image data: reusing cache {path.name}")
        return {**{n: f.get_tensor(n).numpy() for n in f.keys()}, "prompts": json.loads(meta["prompts"])}


def _encode_caption_images(items: list, vae, size: int, seed: int, log) -> torch.Tensor:
    """VAE latents ``(N, C, size, size)`` of the captions' images, encoded in streamed chunks of 64."""
    from o2mkd_ray.data.captions import load_caption_image

    res = size * vae_scale_factor(vae)
    log(f"text-to-image data: encoding {len(items)} images at {res}x{res} with the VAE")
    g = torch.Generator(vae.device).manual_seed(seed)
    chunks = []
    for i in range(0, len(items), 64):  # streamed: 30K images at 512x512 would not fit in memory at once
        images = torch.stack([load_caption_image(im, res) for im in items[i:i + 64]])  # (B, 3, H, W) in [-1, 1]
        chunks.append(encode_images(vae, images, g))
    return torch.cat(chunks)


def cond_dataset(cond_data: dict):
    """From :func:`build_cond_data`'s output: a TensorDataset of ``(x_0 latent (C, h, w), text embedding (L, D)
    [, pooled (P,), time ids (6,)])`` (the :data:`~o2mkd_ray.core.conditioning.COND_NAMES` order) and the empty
    prompt's condition, batch 1 (the condition dropout's stand-in); from
    :func:`o2mkd_ray.data.class_data.build_class_data`'s: ``(x_0 latent, class label ())`` and the null class.

    No copy of the dataset: arrays fetched from Ray's object store are read-only views of shared memory, so every
    worker on a node shares one copy (COCO30K at SD 1.x size: 2 GB of latents + 7 GB of embeddings); batches are
    new tensors anyway.
    """
    from torch.utils.data import TensorDataset

    cond, uncond = conditions(cond_data)
    d = as_dict(cond)
    data = TensorDataset(_view(cond_data["latents"]), *[d[n] for n in item_names(d)])
    return data, cond_map(uncond, lambda v: v.clone())
