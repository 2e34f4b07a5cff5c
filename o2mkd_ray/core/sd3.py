"""Stable Diffusion 3 teachers (``StableDiffusion3Pipeline`` folders or hub ids): recognising a folder, checking its
components, and the conditioning around the MMDiT computed by diffusers' own pipeline.

O2MKD distils only the ``SD3Transformer2DModel``; the students share the teacher's VAE, text encoders (two CLIP,
T5 optional: without it the pipeline feeds zeros in its place) and flow-matching scheduler. Each sample's
condition is ``{"encoder_hidden_states": (L, joint_attention_dim), "pooled_projections": (P,)}``
(:mod:`o2mkd_ray.core.conditioning`), exactly what ``StableDiffusion3Pipeline.encode_prompt`` gives the
transformer at sampling time.
"""

from __future__ import annotations

from pathlib import Path

import torch

from o2mkd_ray.core.dit import saved_class_name
from o2mkd_ray.errors import ConfigError

SD3_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
# StableDiffusion3Pipeline's default max_sequence_length: T5 tokens after the 77 CLIP tokens (zeros without T5)
MAX_SEQUENCE_LENGTH = 256


def is_sd3_folder(path: str | Path) -> bool:
    """True when ``path`` is a local SD3 folder: its ``model_index.json`` names a ``StableDiffusion3`` pipeline,
    or its ``transformer/config.json`` an ``SD3Transformer2DModel`` (a folder saved without the index)."""
    p = Path(path).expanduser()
    index = saved_class_name(p / "model_index.json")
    return ((isinstance(index, str) and index.startswith("StableDiffusion3"))
            or saved_class_name(p / "transformer" / "config.json") == "SD3Transformer2DModel")


def check_sd3_folder(path: str | Path, key: str = "teacher.pretrained") -> None:
    """ConfigError (one line) unless every component an SD3 teacher needs is in the folder (T5 may be absent),
    the transformer being an ``SD3Transformer2DModel`` and the scheduler a flow-matching one."""
    p = Path(path).expanduser()
    missing = [c for c in SD3_COMPONENTS if not (p / c).is_dir()]
    if missing:
        raise ConfigError(f"{key}: {str(p)!r} is not a complete Stable Diffusion 3 folder (missing "
                          f"{', '.join(m + '/' for m in missing)}); save it with StableDiffusion3Pipeline.save_pretrained")
    cls = saved_class_name(p / "transformer" / "config.json")
    if cls != "SD3Transformer2DModel":
        raise ConfigError(f"{key}: {str(p / 'transformer')!r} holds a {cls}, not an SD3Transformer2DModel; give a "
                          "Stable Diffusion 3 folder (StableDiffusion3Pipeline.save_pretrained)")
    sched = saved_class_name(p / "scheduler" / "scheduler_config.json")
    if not (isinstance(sched, str) and sched.startswith("FlowMatch")):
        raise ConfigError(f"{key}: {str(p / 'scheduler')!r} holds a {sched}, not a flow-matching scheduler; an SD3 "
                          "teacher samples with FlowMatchEulerDiscreteScheduler")


def load_sd3_components(spec: str, transformer):
    """The teacher's ``StableDiffusion3Pipeline`` around its already loaded ``transformer`` (text encoders,
    tokenizers, VAE, scheduler), from a hub id or a local folder; a local folder without ``text_encoder_3/`` loads
    without T5 (``encode_prompt`` then reads the width of its zeros from the transformer's config)."""
    from diffusers import StableDiffusion3Pipeline

    p = Path(spec).expanduser()
    no_t5 = {part: None for part in T5_PARTS if p.is_dir() and not (p / part).is_dir()}
    try:
        pipe = StableDiffusion3Pipeline.from_pretrained(spec, transformer=transformer, **no_t5)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"teacher.pretrained: could not load the SD3 text encoders/tokenizers/VAE from {spec!r}: "
                          f"{first}") from None
    for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae):
        if m is not None:
            m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def teacher_sd3_pipeline(spec: str, transformer=None):
    """The SD3 teacher as diffusers' ``StableDiffusion3Pipeline`` (T5 absent when the folder has none), its
    already loaded transformer reused when given."""
    from diffusers import StableDiffusion3Pipeline

    p = Path(spec).expanduser()
    kw = {part: None for part in T5_PARTS if p.is_dir() and not (p / part).is_dir()}
    if transformer is not None:
        kw["transformer"] = transformer
    pipe = StableDiffusion3Pipeline.from_pretrained(spec, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_text_length(pipe, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> int:
    """Tokens of ``encoder_hidden_states`` the transformer attends to: the CLIP tokenizer's length, then
    ``max_sequence_length`` T5 tokens (zeros without T5), as ``encode_prompt`` concatenates them."""
    return int(pipe.tokenizer.model_max_length) + int(max_sequence_length)


@torch.no_grad()
def encode_sd3_prompts(pipe, prompts: list[str], batch_size: int = 64):
    """The SD3 condition of each prompt and of the empty (negative) prompt, exactly as the pipeline builds them.

    Args:
        pipe: from :func:`load_sd3_components`.
    Returns:
        ``(cond, uncond)``: dicts of ``encoder_hidden_states`` ``(N, L, D)`` and ``pooled_projections``
        ``(N, P)``, and the same with batch 1 for the unconditional branch (the empty prompt encoded, as
        ``StableDiffusion3Pipeline`` does for classifier-free guidance without a negative prompt).
    """
    device = next(pipe.text_encoder.parameters()).device
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i:i + batch_size])
        e, _, p, _ = pipe.encode_prompt(chunk, chunk, chunk, device=device, num_images_per_prompt=1,
                                        do_classifier_free_guidance=False)
        embeds.append(e.float().cpu())
        pooled.append(p.float().cpu())
    _, neg, _, neg_pooled = pipe.encode_prompt([""], [""], [""], device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=True)
    cond = {"encoder_hidden_states": torch.cat(embeds), "pooled_projections": torch.cat(pooled)}
    uncond = {"encoder_hidden_states": neg.float().cpu(), "pooled_projections": neg_pooled.float().cpu()}
    return cond, uncond
