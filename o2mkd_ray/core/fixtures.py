"""Tiny random model folders built locally (no hub): the offline demos' and the tests' teachers.

``python -m o2mkd_ray.core.fixtures FOLDER`` writes a tiny Stable Diffusion folder (``pipelines/sd_tiny.yaml``);
``python -m o2mkd_ray.core.fixtures --sdxl FOLDER`` a tiny Stable Diffusion XL one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def byte_vocab() -> dict[str, int]:
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


def make_tiny_sd(folder: str | Path, seed: int = 0, sample_size: int | None = None, block_out_channels=(16, 32),
                 cross_attention_dim: int = 16, max_length: int = 77, prediction_type: str = "epsilon",
                 sd2: bool = False):
    """Writes a tiny random Stable Diffusion folder and returns the ``StableDiffusionPipeline``.

    Long only by its component list: every SD component built in one place, in the order the folder lists them.

    Same component classes and layout as SD 1.x (CrossAttn down/up blocks, a cross-attention mid block,
    ``layers_per_block=2``, a CLIP text encoder, a KL VAE, a PNDM scheduler with SD's betas), at toy size: latents
    ``(4, sample_size, sample_size)``, images twice that. The tokenizer is byte-level, built locally (no download).

    Args:
        folder: where to write it.
        seed: the weights' seed.
        sample_size: latent size (default 8, or 12 with ``sd2``).
        prediction_type: the scheduler's ``epsilon``, ``v_prediction`` (SD 2.x-768) or ``sample``.
        sd2: SD 2.x's UNet options instead: a head dimension per block, linear projections in the transformers,
            upcast attention, and a DDIM scheduler (as SD 2.x checkpoints ship).
    Returns:
        The pipeline written (its VAE still in training mode: load the folder back for bit-exact comparisons).
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    sample_size = sample_size or (12 if sd2 else 8)
    ch = list(block_out_channels)
    v2 = {"attention_head_dim": [2 * (i + 1) for i in range(len(ch))], "use_linear_projection": True,
          "upcast_attention": True} if sd2 else {"attention_head_dim": 2}
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=ch,
        down_block_types=["CrossAttnDownBlock2D"] * (len(ch) - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(ch) - 1),
        cross_attention_dim=cross_attention_dim, norm_num_groups=4, **v2,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=2 * sample_size,
    )
    tokenizer = CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=max_length)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    betas = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
             "steps_offset": 1, "set_alpha_to_one": False, "prediction_type": prediction_type}
    scheduler = (DDIMScheduler(clip_sample=False, **betas) if sd2 else PNDMScheduler(skip_prk_steps=True, **betas))
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    # as in CompVis/stable-diffusion-v1-4's scheduler_config.json: DDIM & co. built from it must not clip x_0
    f = Path(folder) / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "clip_sample": False}, indent=2))
    return pipe


def make_tiny_sdxl(folder: str | Path, seed: int = 0, sample_size: int = 8, block_out_channels=(16, 32),
                   text_dim: int = 16, max_length: int = 77):
    """Writes a tiny random Stable Diffusion XL folder and returns the ``StableDiffusionXLPipeline``.

    Long only by its component list: every SDXL component built in one place, in the order the folder lists them.

    SDXL's layout at toy size: no attention in the first stage, ``transformer_layers_per_block`` growing with depth
    (``[1, 2]``, the mid block taking the last), linear projections, head counts per block, and the ``text_time``
    added conditioning (pooled text embeddings + 6 size/crop ids, each id embedded in ``addition_time_embed_dim``).
    Two CLIP text encoders (a ``CLIPTextModel`` and a ``CLIPTextModelWithProjection``) whose penultimate hidden
    states are concatenated into ``cross_attention_dim = 2 * text_dim``, byte-level tokenizers built locally (no
    download), a KL VAE (images twice the latent size) and SDXL's default ``EulerDiscreteScheduler``.

    Args:
        folder: where to write it.
        seed: the weights' seed.
        sample_size: latent size (images are ``2 * sample_size`` pixels).
        block_out_channels: the UNet's channels per stage (two stages).
        text_dim: each text encoder's width (and the second one's projection dim).
        max_length: the tokenizers' length.
    Returns:
        The pipeline written (its VAE still in training mode: load the folder back for bit-exact comparisons).
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    time_dim = 8  # addition_time_embed_dim: each of the 6 time ids becomes 8 sinusoidal features
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=list(block_out_channels), down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], transformer_layers_per_block=[1, 2],
        attention_head_dim=[2, 4], use_linear_projection=True, cross_attention_dim=2 * text_dim,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=text_dim + 6 * time_dim, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], norm_num_groups=4,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=2 * sample_size,
    )
    tokenizers = [CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=max_length) for _ in range(2)]
    text_cfg = {"vocab_size": len(tokenizers[0]), "hidden_size": text_dim, "intermediate_size": 2 * text_dim,
                "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": max_length,
                "projection_dim": text_dim, "bos_token_id": tokenizers[0].bos_token_id,
                "eos_token_id": tokenizers[0].eos_token_id, "pad_token_id": tokenizers[0].pad_token_id}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    # stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", interpolation_type="linear", prediction_type="epsilon",
        use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=unet.eval(), scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


_USAGE = ("usage: python -m o2mkd_ray.core.fixtures [--sdxl] FOLDER   (writes a tiny random Stable Diffusion, or "
          "with --sdxl Stable Diffusion XL, folder)")

if __name__ == "__main__":  # python -m o2mkd_ray.core.fixtures [--sdxl] FOLDER: tiny offline SD / SDXL folders
    import sys

    args = sys.argv[1:]
    sdxl = args[:1] == ["--sdxl"]
    if len(args) != 1 + sdxl:
        sys.exit(_USAGE)
    (make_tiny_sdxl if sdxl else make_tiny_sd)(args[-1])
    print(args[-1])
