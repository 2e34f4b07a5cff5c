"""SDXL's conditioning around the UNet: two text encoders, pooled text embeddings and the micro-conditioning time
ids, computed by diffusers' own ``StableDiffusionXLPipeline`` so training sees exactly what sampling feeds the UNet.

The students share the teacher's text encoders, tokenizers and VAE; distillation runs in latent space, each
sample's condition being ``{"encoder_hidden_states": (L, 2048), "text_embeds": (1280,), "time_ids": (6,)}`` at the
real SDXL base shape (:mod:`o2mkd_ray.core.conditioning`).
"""

from __future__ import annotations

import torch

from o2mkd_ray.errors import ConfigError


def load_sdxl_components(spec: str):
    """The teacher's SDXL pipeline without its UNet (text encoders, tokenizers, VAE, scheduler, and its
    ``force_zeros_for_empty_prompt`` setting), from a hub id or a local folder."""
    from diffusers import StableDiffusionXLPipeline

    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(spec, unet=None)
    except (OSError, EnvironmentError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"teacher.pretrained: could not load the SDXL text encoders/tokenizers/VAE from {spec!r}: "
                          f"{first}") from None
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae):
        if m is not None:
            m.eval().requires_grad_(False)
    return pipe


def sdxl_time_ids(height: int, width: int) -> torch.Tensor:
    """``(1, 6)`` micro-conditioning ids of an image generated at ``height x width`` with no crop: original size,
    crop top-left (0, 0), target size, the order and values ``StableDiffusionXLPipeline`` uses by default."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


@torch.no_grad()
def encode_sdxl_prompts(pipe, prompts: list[str], height: int, width: int, batch_size: int = 64):
    """The SDXL condition of each prompt and of the empty (negative) prompt, exactly as the pipeline builds them.

    Args:
        pipe: from :func:`load_sdxl_components`.
        height, width: the generated image size in pixels (for ``time_ids``).
    Returns:
        ``(cond, uncond)``: dicts of ``encoder_hidden_states`` ``(N, L, D)``, ``text_embeds`` ``(N, P)``,
        ``time_ids`` ``(N, 6)``, and the same with batch 1 for the unconditional branch (zeros when the pipeline
        has ``force_zeros_for_empty_prompt``, as at sampling time).
    """
    device = next(pipe.text_encoder_2.parameters()).device
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        e, _, p, _ = pipe.encode_prompt(list(prompts[i:i + batch_size]), device=device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
        embeds.append(e.float().cpu())
        pooled.append(p.float().cpu())
    _, neg, _, neg_pooled = pipe.encode_prompt([""], device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=True)
    ids = sdxl_time_ids(height, width)
    cond = {"encoder_hidden_states": torch.cat(embeds), "text_embeds": torch.cat(pooled),
            "time_ids": ids.expand(len(prompts), 6).contiguous()}
    uncond = {"encoder_hidden_states": neg.float().cpu(), "text_embeds": neg_pooled.float().cpu(), "time_ids": ids}
    return cond, uncond
