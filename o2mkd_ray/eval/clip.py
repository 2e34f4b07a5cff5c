"""CLIP score of generated images against their prompts, from a local CLIP folder (no download).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from o2mkd_ray.errors import ConfigError


def check_clip_folder(clip_model) -> Path:
    """The resolved local CLIP folder.

    Raises:
        ConfigError: not given, not a folder, or its config.json is not a CLIP model's.
    """
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
    path = check_clip_folder(clip_model)
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
