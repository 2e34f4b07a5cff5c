"""The text-to-image training data: x_0 latents and text embeddings, computed once and cached per run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from o2mkd_ray.core.atomic import replace_file
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
def synthesize_latents(teacher, scheduler_config, embeds: torch.Tensor, uncond: torch.Tensor, shape, steps: int,
                       guidance: float, seed: int, batch_size: int = 16) -> torch.Tensor:
    """Data-free x_0: the teacher's own samples for each caption (DDIM, classifier-free guidance), in latent space.

    The DDIM scheduler is built from ``scheduler_config``, so it reads the teacher's output as the config's
    ``prediction_type`` says (ε, v or x_0); guidance mixes raw outputs, which is linear in any of them, as
    diffusers' ``StableDiffusionPipeline`` does.

    Args:
        teacher: the teacher callable ``teacher(x_t, t, features=False, cond=...) -> (out, _)`` (in-process or the
            Ray teacher service, so the sampling runs where the teacher lives).
        embeds: ``(N, L, D)`` caption embeddings; ``uncond``: ``(1, L, D)`` the empty prompt's.
        shape: latent shape ``(C, h, w)``.
    Returns:
        ``(N, C, h, w)`` latents.
    """
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(scheduler_config)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, embeds.shape[0], batch_size):
        e = embeds[i:i + batch_size]
        b = e.shape[0]
        x = torch.randn((b, *shape), generator=g) * sched.init_noise_sigma
        sched.set_timesteps(steps)
        cond = torch.cat([uncond.expand(b, -1, -1), e]) if guidance > 1 else e
        for t in sched.timesteps:
            x_in = torch.cat([x, x]) if guidance > 1 else x
            eps, _ = teacher(sched.scale_model_input(x_in, t), torch.full((x_in.shape[0],), int(t)), features=False,
                             cond=cond)
            if guidance > 1:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance * (eps_c - eps_u)
            x = sched.step(eps, t, x).prev_sample
        out.append(x.float())
    return torch.cat(out)


def build_cond_data(cfg, teacher_unet, scheduler_config, teacher=None, cache_dir=None, log=print) -> dict:
    """Caption latents and text embeddings for a Stable Diffusion teacher, cached in ``cache_dir``.

    Captions come from ``data.*`` (:func:`o2mkd_ray.data.captions.read_captions`); their embeddings from the teacher's text
    encoder (exactly as the SD pipeline encodes prompts). With images, x_0 are VAE latents of the images (resized to
    the teacher's resolution); without, the teacher samples one latent per caption (``data.synth_steps`` DDIM steps,
    guidance ``data.synth_guidance``).

    Args:
        teacher_unet: the teacher UNet2DConditionModel (its latent shape; samples in-process if ``teacher`` is None).
        scheduler_config: the teacher's noise schedule.
        teacher: optional teacher callable (e.g. the Ray teacher service) for the synthesis.
        cache_dir: a folder; the cache file is reused when its key matches, written atomically otherwise.
    Returns:
        ``{"latents": (N, C, h, w), "embeds": (N, L, D), "uncond": (1, L, D)}`` float32 numpy arrays and
        ``"prompts"``: the N captions.
    """

    from safetensors.torch import save_file

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
    spec = cfg.teacher.pretrained
    parts = load_sd_components(spec)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the driver's GPU when it has one
    parts["text_encoder"].to(device)
    embeds = encode_prompts(parts["tokenizer"], parts["text_encoder"], prompts)
    uncond = encode_prompts(parts["tokenizer"], parts["text_encoder"], [""])
    c = teacher_unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    shape = (c.in_channels, size, size)
    if "image" in df:
        latents = _encode_caption_images(list(df["image"]), parts["vae"].to(device), size, cfg.train.seed, log)
    else:
        from o2mkd_ray.core.teacher import TeacherFn

        log(f"text-to-image data: no images; sampling {len(prompts)} latents with the teacher "
            f"({cfg.data.synth_steps} DDIM steps, guidance {cfg.data.synth_guidance})")
        latents = synthesize_latents(teacher or TeacherFn(teacher_unet, []), scheduler_config, embeds, uncond, shape,
                                     cfg.data.synth_steps, cfg.data.synth_guidance, cfg.train.seed)
    out = {"latents": latents.float().contiguous(), "embeds": embeds.contiguous(), "uncond": uncond.contiguous()}
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
        return {**{n: f.get_tensor(n).numpy() for n in ("latents", "embeds", "uncond")},
                "prompts": json.loads(meta["prompts"])}


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
    """From :func:`build_cond_data`'s output: a TensorDataset of ``(x_0 latent (C, h, w), text embedding (L, D))``
    and the empty prompt's embedding ``(1, L, D)`` (the condition dropout's stand-in).

    No copy of the dataset: arrays fetched from Ray's object store are read-only views of shared memory, so every
    worker on a node shares one copy (COCO30K at SD 1.x size: 2 GB of latents + 7 GB of embeddings); batches are
    new tensors anyway.
    """
    import warnings

    from torch.utils.data import TensorDataset

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        data = TensorDataset(torch.from_numpy(cond_data["latents"]), torch.from_numpy(cond_data["embeds"]))
    return data, torch.from_numpy(cond_data["uncond"].copy())
