"""Stable Diffusion components around the UNet (text encoder, tokenizer, VAE): folder checks, loading, encoders.

O2MKD distils only the UNet (``UNet2DConditionModel``); the students share the teacher's text encoder, tokenizer and
VAE, and distillation runs in latent space.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from o2mkd_ray.errors import ConfigError

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_COMPONENTS = (*SD_COMPONENTS, "text_encoder_2", "tokenizer_2")


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


def is_sdxl_folder(path: str | Path) -> bool:
    """True when ``path`` is a local Stable Diffusion XL folder: its ``model_index.json`` names an SDXL pipeline
    class (``StableDiffusionXLPipeline`` and its variants)."""
    f = Path(path).expanduser() / "model_index.json"
    try:
        cls = json.loads(f.read_text()).get("_class_name") if f.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, AttributeError):
        return False
    return isinstance(cls, str) and "StableDiffusionXL" in cls


def require_text_to_image_extra(key: str) -> None:
    """ConfigError (one line naming ``key``) when the ``sd`` extra (transformers) is not installed: text-to-image
    teachers and pipelines need it; everything unconditional runs without it."""
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(f"{key}: text-to-image (Stable Diffusion) teachers and pipelines need the 'sd' extra; "
                          "install it with pip install 'o2mkd-ray[sd]'")


def check_sd_folder(path: str | Path, key: str = "teacher.pretrained", xl: bool = False) -> None:
    """ConfigError (one line) unless every component Stable Diffusion (``xl``: SDXL) needs is in the folder."""
    p = Path(path).expanduser()
    missing = [c for c in (SDXL_COMPONENTS if xl else SD_COMPONENTS) if not (p / c).is_dir()]
    if missing:
        name, cls = ("Stable Diffusion XL", "StableDiffusionXLPipeline") if xl else \
            ("Stable Diffusion", "StableDiffusionPipeline")
        raise ConfigError(f"{key}: {str(p)!r} is not a complete {name} folder (missing "
                          f"{', '.join(m + '/' for m in missing)}); save it with {cls}.save_pretrained")


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


def text_length(spec: str) -> int:
    """Tokens per prompt the teacher's UNet attends to: its tokenizer's ``model_max_length`` (77 for SD), the
    ``encoder_hidden_states`` length that the pipeline's text encoder gives and that costs count."""
    from transformers import CLIPTokenizer

    try:
        return int(CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer").model_max_length)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"teacher.pretrained: could not load the Stable Diffusion tokenizer from {spec!r}: "
                          f"{first}") from None


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
    """Latents ``(N, C_lat, h, w)`` of images ``(N, 3, H, W)`` in [-1, 1]: a VAE posterior sample minus the VAE's
    ``shift_factor`` (SD3's; 0 for SD and SDXL) times ``scaling_factor`` (what the denoiser was trained on)."""
    device = next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i in range(0, images.shape[0], batch_size):
        dist = vae.encode(images[i:i + batch_size].to(device, dtype)).latent_dist
        out.append(((dist.sample(generator=generator) - shift) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images ``(N, 3, H, W)`` in [0, 1] from SD latents (SD3's: the VAE's ``shift_factor`` added back)."""
    p = next(vae.parameters())
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = vae.decode(latents.to(p.device, p.dtype) / vae.config.scaling_factor + shift).sample
    return (x.float() / 2 + 0.5).clamp(0, 1).cpu()
