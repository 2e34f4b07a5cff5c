"""The one definition of cost, used by distill (``report.json``), eval and tune.

* per forward: parameters and MACs of one denoiser call at batch 1 (:func:`forward_cost`, via
  ``torch.utils.flop_counter``), for UNets and for the transformer denoisers (DiT, SD3's MMDiT) alike, each called
  with its own forward signature and zero stand-ins for its conditioning (:func:`transformer_stand_in`);
* per sampling run: the MACs of every UNet call the sampler makes, each timestep on the student that owns it
  (:func:`sampling_cost`), on the timesteps of the run's scheduler and step count (:func:`sampler_timesteps`),
  with classifier-free guidance as 2 passes per call (:func:`guidance_passes`). The cost of an O2MKD run is
  its ratio to the teacher's run on the same timesteps.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from o2mkd_ray.core.schedulers import make_scheduler
from o2mkd_ray.core.segments import Segments


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not).

    Args:
        model: any module.
    Returns:
        The parameter count.
    """
    return sum(p.numel() for p in model.parameters())


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that F.scaled_dot_product_attention uses
# here, which would silently count attention as free.
_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def count_macs(
    model: nn.Module,
    sample_shape: Sequence[int] | None = None,
    timestep: int = 500,
    seq_len: int = 77,
    **forward_kwargs: Any,
) -> int:
    """Multiply-accumulates of one forward ``model(x_t, t)``, counted with ``torch.utils.flop_counter``.

    Counts matmuls, convolutions and attention (MACs = FLOPs / 2); elementwise ops and norms are not counted.
    Works on a model on the ``meta`` device too (no compute, shapes only). A transformer denoiser (DiT, SD3) is
    called as ``model(x, timestep=t, ...)`` with zero stand-ins for the conditioning it is not given
    (:func:`transformer_stand_in`; ``seq_len`` text tokens for SD3). A conditional model
    (``UNet2DConditionModel``, or a config with ``cross_attention_dim``) called without ``encoder_hidden_states``
    gets zeros of shape ``(B, seq_len, cross_attention_dim)`` (``encoder_hid_dim`` when set) as the text, and an
    SDXL UNet (``addition_embed_type="text_time"``) called without ``added_cond_kwargs`` gets zeros as its pooled
    text ``text_embeds`` (B, projection_class_embeddings_input_dim - 6 * addition_time_embed_dim) and ``time_ids``
    (B, 6) (:func:`text_time_stand_in`).

    Args:
        model: a ``UNet2DModel`` / ``UNet2DConditionModel``, a ``DiTTransformer2DModel`` /
            ``SD3Transformer2DModel``, or any module called as ``model(x, t)``.
        sample_shape: input shape; default ``(1, in_channels, sample_size, sample_size)`` from ``model.config``.
        timestep: the timestep passed as a ``(B,)`` long tensor.
        seq_len: text length of the stand-in ``encoder_hidden_states`` of a conditional model (77: SD's CLIP
            tokenizer length); ignored when ``encoder_hidden_states`` is passed or the model is unconditional.
        **forward_kwargs: extra keyword arguments for the forward (e.g. ``class_labels``, ``encoder_hidden_states``,
            ``added_cond_kwargs``).
    Returns:
        MACs of one forward at the given shape (batch 1 by default).
    """
    cfg = getattr(model, "config", None) or {}
    if sample_shape is None:
        size, ch = cfg.get("sample_size"), cfg.get("in_channels")
        if size is None or ch is None:
            raise ValueError(
                "count_macs: model has no config.sample_size/in_channels; pass sample_shape=(1, C, H, W)"
            )
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        sample_shape = (1, ch, h, w)
    p = next(model.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    x_t = torch.zeros(tuple(sample_shape), device=device, dtype=dtype)  # (B, C, H, W)
    t = torch.full((x_t.shape[0],), int(timestep), device=device, dtype=torch.long)
    stand_in = transformer_stand_in(cfg, x_t.shape[0], seq_len, device, dtype)
    if stand_in is not None:  # keyword timestep: SD3's forward takes encoder_hidden_states second
        args, kwargs = (x_t,), {"timestep": t, **stand_in, **forward_kwargs}
    else:
        args, kwargs = (x_t, t), {**_unet_stand_in(model, cfg, x_t, seq_len, forward_kwargs), **forward_kwargs}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops() // 2


def _unet_stand_in(model: nn.Module, cfg, x_t: torch.Tensor, seq_len: int, given: Mapping) -> dict:
    """Zero text (and SDXL added conditioning) for a conditional UNet not given them; {} otherwise."""
    conditional = isinstance(model, UNet2DConditionModel) or (
        isinstance(cfg, Mapping) and "cross_attention_dim" in cfg
    )
    if not conditional:
        return {}
    out = {}
    if "encoder_hidden_states" not in given:
        dim = cfg.get("encoder_hid_dim") or cfg.get("cross_attention_dim")
        if not isinstance(dim, int):
            raise ValueError(
                f"count_macs: cannot infer the text width from cross_attention_dim={dim!r}; "
                "pass encoder_hidden_states=(B, L, D)"
            )
        out["encoder_hidden_states"] = torch.zeros(
            x_t.shape[0], int(seq_len), dim, device=x_t.device, dtype=x_t.dtype
        )  # (B, L, D)
    if "added_cond_kwargs" not in given:
        added = text_time_stand_in(cfg, x_t.shape[0], x_t.device, x_t.dtype)
        if added is not None:
            out["added_cond_kwargs"] = added
    return out


def transformer_stand_in(cfg, batch: int, seq_len: int = 77, device=None, dtype=None) -> dict | None:
    """Zero conditioning for a transformer denoiser's forward (None for a UNet or any other module).

    A DiT (``num_embeds_ada_norm`` and ``patch_size`` in its config) gets ``class_labels`` (B,) of class 0; an SD3
    MMDiT (``joint_attention_dim``) gets ``encoder_hidden_states`` (B, seq_len, joint_attention_dim) and
    ``pooled_projections`` (B, pooled_projection_dim). Configs of a multi-student model that records these keys
    count the same way.
    """
    if not isinstance(cfg, Mapping) or "patch_size" not in cfg:
        return None
    if cfg.get("joint_attention_dim") is not None:
        return {"encoder_hidden_states": torch.zeros(batch, int(seq_len), int(cfg["joint_attention_dim"]),
                                                     device=device, dtype=dtype),
                "pooled_projections": torch.zeros(batch, int(cfg["pooled_projection_dim"]), device=device,
                                                  dtype=dtype)}
    if cfg.get("num_embeds_ada_norm") is not None:
        return {"class_labels": torch.zeros(batch, device=device, dtype=torch.long)}
    return None


def text_time_stand_in(cfg: Mapping, batch: int, device=None, dtype=None) -> dict | None:
    """Zero ``added_cond_kwargs`` for a UNet with SDXL's ``text_time`` added conditioning (None for others).

    ``text_embeds`` is the pooled text (B, projection_class_embeddings_input_dim - 6 * addition_time_embed_dim)
    and ``time_ids`` the 6 size/crop ids (B, 6), as ``StableDiffusionXLPipeline`` passes them.
    """
    if cfg.get("addition_embed_type") != "text_time":
        return None
    n_ids, per_id = 6, int(cfg["addition_time_embed_dim"])
    pooled = int(cfg["projection_class_embeddings_input_dim"]) - n_ids * per_id
    return {"text_embeds": torch.zeros(batch, pooled, device=device, dtype=dtype),
            "time_ids": torch.zeros(batch, n_ids, device=device, dtype=dtype)}


def forward_cost(model: nn.Module, shape: Sequence[int], seq_len: int = 77, **forward_kwargs: Any) -> dict:
    """Parameters and MACs of one forward at batch 1.

    Args:
        model: a UNet, a DiT / SD3 transformer, or any module called as ``model(x, t)``.
        shape: the input ``(C, H, W)`` (latents for Stable Diffusion, DiT and SD3).
        seq_len: text tokens a text-conditioned UNet or SD3 transformer sees (ignored by unconditional ones).
        **forward_kwargs: example inputs for the forward at batch 1 (``encoder_hidden_states``; for SDXL UNets
            ``added_cond_kwargs={"text_embeds": (1, D), "time_ids": (1, 6)}``); missing text inputs of a
            conditional UNet get zero stand-ins (:func:`count_macs`).
    Returns:
        ``{"params": int, "macs": int}``.
    """
    macs = count_macs(model, (1, *shape), seq_len=seq_len, **forward_kwargs)
    return {"params": int(count_params(model)), "macs": int(macs)}


costs = forward_cost  # the name run folders and tests used before the sampling cost joined it


def guidance_passes(guidance_scale: float | None, unet_config: Mapping | None = None) -> int:
    """UNet passes per sampler call: 2 with classifier-free guidance (conditional and unconditional branch),
    else 1.

    Guidance applies as in diffusers' ``StableDiffusionPipeline``: ``guidance_scale > 1`` and a UNet without
    ``time_cond_proj_dim`` (guidance-distilled UNets take the scale as an input instead of a second branch).

    Args:
        guidance_scale: the sampler's guidance weight; None for unconditional sampling.
        unet_config: the sampling UNet's config (a mapping); None reads as no ``time_cond_proj_dim``.
    Returns:
        1 or 2.
    """
    distilled = unet_config is not None and unet_config.get("time_cond_proj_dim") is not None
    return 2 if guidance_scale is not None and guidance_scale > 1 and not distilled else 1


def scheduler_timesteps(scheduler, steps: int) -> list[int]:
    """The timesteps of one sampling run of ``steps`` steps on (a copy of) ``scheduler``: one entry per UNet
    call, so a scheduler that calls the UNet twice on a timestep (PNDM's warm-up, Heun) lists it twice.

    Args:
        scheduler: a diffusers sampling scheduler instance (left untouched).
        steps: ``num_inference_steps``.
    Returns:
        The timesteps as ints (fractional ones floored, as :meth:`Segments.owner` does).
    """
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(int(steps))
    return [int(float(t) // 1) for t in sched.timesteps]


def sampler_timesteps(scheduler_name: str, scheduler_config, steps: int) -> list[int]:
    """:func:`scheduler_timesteps` of the scheduler ``scheduler_name`` (``sampling.scheduler``: a short name or
    a diffusers class) on the teacher's noise schedule ``scheduler_config``."""
    return scheduler_timesteps(make_scheduler(scheduler_name, scheduler_config), steps)


def sampling_cost(student_macs: Sequence[int], teacher_macs: int, boundaries: Sequence[int],
                  timesteps: Iterable[float], passes: int = 1) -> dict:
    """MACs of one sampling run per image, O2MKD (each call on the student owning its timestep) vs the teacher
    on the same timesteps.

    ``o2mkd = passes · Σ_k n_k · MACs_k`` with ``n_k`` the calls on timesteps student k owns;
    ``teacher = passes · len(timesteps) · MACs_T``; ``macs_ratio = o2mkd / teacher``. The ratio weights each
    student by the steps it takes in this run, not by its share of ``[0, T)``, and does not depend on
    ``passes``.

    Args:
        student_macs: MACs of one forward of each student (:func:`forward_cost`).
        teacher_macs: MACs of one teacher forward.
        boundaries: segment boundaries ``[0, b_1, ..., T]``.
        timesteps: one entry per UNet call (:func:`sampler_timesteps`).
        passes: UNet passes per call (:func:`guidance_passes`).
    Returns:
        ``unet_calls``, ``passes``, ``steps_per_student``, ``student_macs_per_step``, ``teacher_macs_per_step``,
        ``student_macs_per_run`` (per student), ``o2mkd_macs_per_run``, ``teacher_macs_per_run``,
        ``macs_ratio``.
    Raises:
        ValueError: ``student_macs`` does not hold one entry per segment.
    """
    seg = Segments(boundaries)
    if len(student_macs) != seg.n:
        raise ValueError(f"sampling_cost: {len(student_macs)} student MACs for {seg.n} segments "
                         f"{list(boundaries)}")
    owners = [seg.owner(t) for t in timesteps]
    steps = [owners.count(k) for k in range(seg.n)]
    per_run = [int(m) * n * passes for m, n in zip(student_macs, steps)]
    teacher_run = int(teacher_macs) * len(owners) * passes
    return {"unet_calls": len(owners), "passes": passes, "steps_per_student": steps,
            "student_macs_per_step": [int(m) for m in student_macs], "teacher_macs_per_step": int(teacher_macs),
            "student_macs_per_run": per_run, "o2mkd_macs_per_run": sum(per_run),
            "teacher_macs_per_run": teacher_run, "macs_ratio": sum(per_run) / max(1, teacher_run)}
