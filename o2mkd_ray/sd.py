"""Stable Diffusion teachers: the parts around the UNet (text encoder, tokenizer, VAE), Ray-free.

O2MKD distils only the UNet (``UNet2DConditionModel``); the students share the teacher's text encoder, tokenizer
and VAE. Distillation runs in latent space: images are encoded once by the VAE (or, with prompts only, latents are
synthesised once by the teacher itself), prompts are encoded once by the text encoder, and both are cached.

:func:`make_tiny_sd` writes a tiny random Stable Diffusion folder (same layout as ``CompVis/stable-diffusion-v1-4``:
``unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json``) with a locally built tokenizer: what the tests
and the offline demo use, since model hubs are not reachable everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def is_sd_folder(path: str | Path) -> bool:
    """True when ``path`` is a local diffusers Stable Diffusion folder (a UNet2DConditionModel + text encoder + VAE)."""
    p = Path(path).expanduser()
    if not (p / "unet" / "config.json").is_file():
        return False
    try:
        cls = json.loads((p / "unet" / "config.json").read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return cls == "UNet2DConditionModel"


def check_sd_folder(path: str | Path, key: str = "teacher.pretrained") -> None:
    """ConfigError (one line) unless every component Stable Diffusion needs is in the folder."""
    p = Path(path).expanduser()
    missing = [c for c in SD_COMPONENTS if not (p / c).is_dir()]
    if missing:
        raise ConfigError(f"{key}: {str(p)!r} is not a complete Stable Diffusion folder (missing "
                          f"{', '.join(m + '/' for m in missing)}); save it with StableDiffusionPipeline.save_pretrained")


def load_sd_components(spec: str, dtype: torch.dtype = torch.float32) -> dict:
    """The teacher's text encoder, tokenizer and VAE (what the students share), from a hub id or a local folder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(spec, subfolder="text_encoder", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(spec, subfolder="vae", torch_dtype=dtype)
    except (OSError, EnvironmentError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"teacher.pretrained: could not load the Stable Diffusion text encoder/tokenizer/VAE from "
                          f"{spec!r}: {first}") from None
    text_encoder.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae}


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell (8 for SD 1.x), as StableDiffusionPipeline computes it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Text embeddings ``(N, L, D)`` exactly as ``StableDiffusionPipeline.encode_prompt`` makes them (clip_skip None)."""
    device = next(text_encoder.parameters()).device
    out = []
    use_mask = getattr(text_encoder.config, "use_attention_mask", False)
    for i in range(0, len(prompts), batch_size):
        tok = tokenizer(list(prompts[i:i + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt")
        mask = tok.attention_mask.to(device) if use_mask else None
        out.append(text_encoder(tok.input_ids.to(device), attention_mask=mask)[0].float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, generator: torch.Generator | None = None,
                  batch_size: int = 16) -> torch.Tensor:
    """Latents ``(N, C_lat, h, w)`` of images ``(N, 3, H, W)`` in [-1, 1]: a VAE posterior sample times
    ``scaling_factor`` (what SD was trained on)."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    out = []
    for i in range(0, images.shape[0], batch_size):
        dist = vae.encode(images[i:i + batch_size].to(device, dtype)).latent_dist
        out.append((dist.sample(generator=generator) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [0, 1] from SD latents."""
    p = next(vae.parameters())
    x = vae.decode(latents.to(p.device, p.dtype) / vae.config.scaling_factor).sample
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu()


def _byte_vocab() -> dict[str, int]:
    """A byte-level CLIP vocabulary with no merges: every byte is a token (GPT-2's byte-to-unicode table)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def make_tiny_sd(folder: str | Path, seed: int = 0, sample_size: int = 8, block_out_channels=(16, 32),
                 cross_attention_dim: int = 16, max_length: int = 77):
    """Writes a tiny random Stable Diffusion folder and returns the ``StableDiffusionPipeline``.

    Same component classes and layout as SD 1.x (CrossAttn down/up blocks, a cross-attention mid block,
    ``layers_per_block=2``, a CLIP text encoder, a KL VAE, a PNDM scheduler with SD's betas), at toy size: latents
    ``(4, sample_size, sample_size)``, images twice that. The tokenizer is byte-level, built locally (no download).
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    ch = list(block_out_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=ch,
        down_block_types=["CrossAttnDownBlock2D"] * (len(ch) - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(ch) - 1),
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=2 * sample_size,
    )
    tokenizer = CLIPTokenizer(vocab=_byte_vocab(), merges=[], model_max_length=max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    # as in CompVis/stable-diffusion-v1-4's scheduler_config.json: DDIM & co. built from it must not clip x_0
    f = Path(folder) / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "clip_sample": False}, indent=2))
    return pipe


# --------------------------------------------------------------------------------------------------------------
# the distillation data of a text-to-image run: latents x_0 and text embeddings, computed once and cached


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

    Args:
        teacher: the teacher callable ``teacher(x_t, t, features=False, cond=...) -> (eps, _)`` (in-process or the
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

    Captions come from ``data.*`` (:func:`o2mkd_ray.data.read_captions`); their embeddings from the teacher's text
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
    import os

    from safetensors import safe_open
    from safetensors.torch import save_file

    from .data import load_caption_image, read_captions

    key = cond_cache_key(cfg)
    path = Path(cache_dir) / f"cond-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") == key:
                log(f"text-to-image data: reusing cache {path.name}")
                return {**{n: f.get_tensor(n).numpy() for n in ("latents", "embeds", "uncond")},
                        "prompts": json.loads(meta["prompts"])}
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
        res = size * vae_scale_factor(parts["vae"])
        log(f"text-to-image data: encoding {len(df)} images at {res}x{res} with the VAE")
        vae, items, chunks = parts["vae"].to(device), list(df["image"]), []
        g = torch.Generator(device).manual_seed(cfg.train.seed)
        for i in range(0, len(items), 64):  # streamed: 30K images at 512x512 would not fit in memory at once
            images = torch.stack([load_caption_image(im, res) for im in items[i:i + 64]])  # (B, 3, H, W) in [-1, 1]
            chunks.append(encode_images(vae, images, g))
        latents = torch.cat(chunks)
    else:
        from .teacher import TeacherFn

        log(f"text-to-image data: no images; sampling {len(prompts)} latents with the teacher "
            f"({cfg.data.synth_steps} DDIM steps, guidance {cfg.data.synth_guidance})")
        latents = synthesize_latents(teacher or TeacherFn(teacher_unet, []), scheduler_config, embeds, uncond, shape,
                                     cfg.data.synth_steps, cfg.data.synth_guidance, cfg.train.seed)
    out = {"latents": latents.float().contiguous(), "embeds": embeds.contiguous(), "uncond": uncond.contiguous()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        save_file(out, str(tmp), metadata={"key": key, "prompts": json.dumps(prompts)})
        os.replace(tmp, path)
    return {**{n: v.numpy() for n, v in out.items()}, "prompts": prompts}


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


if __name__ == "__main__":  # python -m o2mkd_ray.sd FOLDER: write the tiny offline SD folder (pipelines/sd_tiny.yaml)
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m o2mkd_ray.sd FOLDER   (writes a tiny random Stable Diffusion folder)")
    make_tiny_sd(sys.argv[1])
    print(sys.argv[1])
