"""Tiny random model folders built locally (no hub): the offline demos' and the tests' teachers.

``python -m o2mkd_ray.core.fixtures FOLDER`` writes a tiny Stable Diffusion folder (``pipelines/sd_tiny.yaml``);
``python -m o2mkd_ray.core.fixtures --sdxl FOLDER`` a tiny Stable Diffusion XL one, ``--dit FOLDER`` a tiny
class-conditional DiT and ``--sd3 FOLDER`` a tiny Stable Diffusion 3 (MMDiT, flow matching) one.
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


def _tiny_vae(latent_channels: int, sample_size: int, **kwargs):
    """A two-stage KL VAE: images ``2 * sample_size`` pixels, latents ``(latent_channels, sample_size, ...)``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=[8, 16],
        norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        sample_size=2 * sample_size, **kwargs,
    ).eval()


def make_tiny_dit(folder: str | Path, seed: int = 0, sample_size: int = 8, num_layers: int = 4, heads: int = 4,
                  head_dim: int = 8, num_classes: int = 1000):
    """Writes a tiny random class-conditional DiT folder and returns the ``DiTPipeline``.

    DiT's layout (facebook/DiT-XL-2-256) at toy size: a ``DiTTransformer2DModel`` with learned sigma (its output has
    ``2 * in_channels`` channels: eps and the variance interpolation), patch size 2, ``num_embeds_ada_norm`` classes
    (``DiTPipeline`` uses label ``num_classes`` as the null class of classifier-free guidance, hence 1000 by
    default), a KL VAE with 4 latent channels, DiT's DDIM scheduler (linear betas, 1000 steps) and a few
    ``id2label`` names.

    Args:
        folder: where to write it.
        seed: the weights' seed.
        sample_size: latent size (images are ``2 * sample_size`` pixels).
        num_layers, heads, head_dim: the transformer's depth, heads and head width (width = heads * head_dim).
        num_classes: class labels the transformer embeds (plus one null class).
    Returns:
        The pipeline written.
    """
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=sample_size, patch_size=2, num_embeds_ada_norm=num_classes,
    ).eval()
    # facebook/DiT-XL-2-256's scheduler_config.json
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                              clip_sample=False)
    id2label = {0: "tench, Tinca tinca", 1: "goldfish", 2: "white shark"}
    pipe = DiTPipeline(transformer=transformer, vae=_tiny_vae(4, sample_size), scheduler=scheduler,
                       id2label=id2label)
    pipe.save_pretrained(folder, safe_serialization=True)
    # DiTPipeline does not save id2label; facebook/DiT-XL-2-256 keeps it in model_index.json, where from_pretrained
    # finds it (an __init__ argument)
    f = Path(folder) / "model_index.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "id2label": {str(k): v for k, v in id2label.items()}},
                            indent=2))
    return pipe


def make_tiny_sd3(folder: str | Path, seed: int = 0, sample_size: int = 8, num_layers: int = 3, heads: int = 4,
                  head_dim: int = 8, text_dim: int = 16, max_length: int = 77, shift: float = 3.0):
    """Writes a tiny random Stable Diffusion 3 folder (without T5) and returns the ``StableDiffusion3Pipeline``.

    SD3's layout at toy size: an ``SD3Transformer2DModel`` (MMDiT: joint text/image attention, the last block
    ``context_pre_only``; patch size 2; 16 latent channels, velocity prediction), a KL VAE with 16 latent channels
    and SD3's ``shift_factor``, ``FlowMatchEulerDiscreteScheduler`` with SD3's ``shift=3.0`` (timesteps are
    ``1000 * sigma`` floats after the shift), and two ``CLIPTextModelWithProjection`` encoders with byte-level
    tokenizers built locally. No T5: ``text_encoder_3`` / ``tokenizer_3`` are None and the pipeline uses zeros of
    width ``joint_attention_dim`` in its place; the two CLIP encoders' penultimate states (``2 * text_dim``) are
    zero-padded to ``joint_attention_dim`` and their pooled projections concatenated (``pooled_projection_dim``).

    Args:
        folder: where to write it.
        seed: the weights' seed.
        sample_size: latent size (images are ``2 * sample_size`` pixels).
        num_layers, heads, head_dim: the transformer's depth, heads and head width.
        text_dim: each CLIP encoder's width and projection dim.
        max_length: the tokenizers' length.
        shift: the flow-matching scheduler's timestep shift.
    Returns:
        The pipeline written.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=3 * text_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=2 * text_dim, pos_embed_max_size=sample_size,
    ).eval()
    tokenizers = [CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=max_length) for _ in range(2)]
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizers[0]), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_length, projection_dim=text_dim,
        bos_token_id=tokenizers[0].bos_token_id, eos_token_id=tokenizers[0].eos_token_id,
        pad_token_id=tokenizers[0].pad_token_id,
    )
    encoders = [CLIPTextModelWithProjection(text_cfg).eval() for _ in range(2)]
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=_tiny_vae(16, sample_size, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=encoders[0], tokenizer=tokenizers[0], text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe


_MAKERS = {"--sdxl": make_tiny_sdxl, "--dit": make_tiny_dit, "--sd3": make_tiny_sd3}
_USAGE = ("usage: python -m o2mkd_ray.core.fixtures [--sdxl | --dit | --sd3] FOLDER   (writes a tiny random Stable "
          "Diffusion folder, or with a flag a Stable Diffusion XL / class-conditional DiT / Stable Diffusion 3 one)")

if __name__ == "__main__":  # python -m o2mkd_ray.core.fixtures [--sdxl|--dit|--sd3] FOLDER: tiny offline folders
    import sys

    args = sys.argv[1:]
    flag = args[0] if len(args) == 2 and args[0] in _MAKERS else None
    if len(args) != 1 + (flag is not None):
        sys.exit(_USAGE)
    _MAKERS.get(flag, make_tiny_sd)(args[-1])
    print(args[-1])
