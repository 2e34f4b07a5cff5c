"""Conditioning of conditional denoisers as one value: a tensor (SD 1.x/2.x text embeddings) or a flat dict of
tensors (SDXL: text embeddings, pooled text embeddings, micro-conditioning time ids; SD3: text embeddings and pooled
projections; DiT: class labels).

Everything between the data and the UNet (the teacher service's dynamic batching, condition dropout, held-out
batches, the Ray object store) handles a condition through these few functions, so a teacher family with more
conditioning inputs adds names here instead of branches everywhere. Every entry is batch-first: row ``i`` of each
tensor belongs to sample ``i``.

Names (the dataset's tuple order after ``x_0``): ``encoder_hidden_states`` ``(B, L, D)``, ``text_embeds``
``(B, P)`` (SDXL's pooled projection of its second text encoder), ``time_ids`` ``(B, 6)`` (SDXL's original size,
crop offset and target size), ``pooled_projections`` ``(B, P)`` (SD3's pooled CLIP embeddings, given to its
MMDiT beside ``encoder_hidden_states``), ``class_labels`` ``(B,)`` integer (DiT's classes; its null class, the
number of classes, is the unconditional one). A dataset's items carry one of :data:`ITEM_FORMS` after ``x_0``.
"""

from __future__ import annotations

from typing import Callable, Union

import numpy as np
import torch

COND_NAMES = ("encoder_hidden_states", "text_embeds", "time_ids", "pooled_projections", "class_labels")
# The conditioning entries a dataset item carries after x_0, in order, by their number (SD 1.x/2.x: the text
# embedding alone, or DiT's class label alone; SD3: text and pooled projections; SDXL: text, pooled, time ids)
ITEM_FORMS = {2: ("encoder_hidden_states", "pooled_projections"),
              3: ("encoder_hidden_states", "text_embeds", "time_ids")}
ADDED = ("text_embeds", "time_ids")  # what diffusers' UNet2DConditionModel reads from ``added_cond_kwargs``

Cond = Union[torch.Tensor, dict]


def as_dict(cond) -> dict | None:
    """``{name: tensor}`` for any condition (a bare tensor is the text embeddings); None stays None."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return cond
    return {"encoder_hidden_states": cond}


def item_names(cond: dict) -> tuple[str, ...]:
    """The names of a condition's entries in dataset item order (:data:`ITEM_FORMS`)."""
    for names in ITEM_FORMS.values():
        if set(names) == set(cond):
            return names
    return tuple(n for n in COND_NAMES if n in cond)


def from_items(items: tuple | list):
    """The condition of a dataset batch's items after ``x_0`` (positional, :data:`ITEM_FORMS`): a tensor
    when there is only the text embedding (the SD 1.x form), ``{"class_labels": ...}`` when there is only an
    integer tensor (DiT's class labels), else a dict; None for no items."""
    if not items:
        return None
    if len(items) == 1:
        return items[0] if items[0].dtype.is_floating_point else {"class_labels": items[0]}
    if len(items) not in ITEM_FORMS:
        raise ValueError(f"a dataset item carries {len(items)} conditioning entries; known forms have "
                         f"{sorted({1, *ITEM_FORMS})}")
    return dict(zip(ITEM_FORMS[len(items)], items))


def cond_map(cond, fn: Callable):
    """``fn`` applied to every tensor/array of the condition, keeping its form (tensor or dict)."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: fn(v) for k, v in cond.items()}
    return fn(cond)


def cond_cat(conds: list):
    """Batch-wise concatenation of conditions of one form (torch tensors or numpy arrays)."""
    if conds[0] is None:
        return None
    cat = torch.cat if isinstance(next(iter(as_dict(conds[0]).values())), torch.Tensor) else np.concatenate
    if isinstance(conds[0], dict):
        return {k: cat([c[k] for c in conds]) for k in conds[0]}
    return cat(conds)


def cond_slice(cond, i: int, j: int):
    """Rows ``i:j`` of every entry."""
    return cond_map(cond, lambda v: v[i:j])


def cond_key(cond) -> tuple | None:
    """What must match for two requests' conditions to share one forward: names and per-sample shapes."""
    if cond is None:
        return None
    return tuple(sorted((k, tuple(v.shape[1:])) for k, v in as_dict(cond).items()))


def cond_where(drop: torch.Tensor, uncond, cond):
    """Per sample, the unconditional condition where ``drop`` (B,) is True, else ``cond``'s row (condition dropout
    for classifier-free guidance). ``uncond`` has batch 1 and the same form as ``cond``."""
    def pick(u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mask = drop.view(-1, *([1] * (c.dim() - 1)))
        return torch.where(mask, u.to(c.dtype).expand_as(c), c)

    if isinstance(cond, dict):
        return {k: pick(uncond[k], v) for k, v in cond.items()}
    return pick(uncond, cond)


def cond_kwargs(cond, device=None, dtype: torch.dtype | None = None) -> dict:
    """The forward kwargs of a conditional denoiser (``encoder_hidden_states``, and ``added_cond_kwargs`` for
    SDXL's ``text_embeds`` / ``time_ids``, SD3's ``pooled_projections`` as its own keyword; DiT's integer
    ``class_labels``, never cast to ``dtype``); ``{}`` when ``cond`` is None."""
    if cond is None:
        return {}
    d = as_dict(cond)
    if "class_labels" in d:
        return {"class_labels": d["class_labels"].to(device=device)}
    move = lambda v: v.to(device=device, dtype=dtype if dtype is not None else v.dtype)  # noqa: E731
    kw = {"encoder_hidden_states": move(d["encoder_hidden_states"])}
    if "pooled_projections" in d:
        kw["pooled_projections"] = move(d["pooled_projections"])
    added = {k: move(d[k]) for k in ADDED if k in d}
    if added:
        kw["added_cond_kwargs"] = added
    return kw


def to_numpy(cond):
    """The condition as numpy arrays (what crosses to a Ray actor)."""
    return cond_map(cond, lambda v: v.detach().cpu().numpy())


def to_torch(cond):
    """The condition as torch tensors (zero-copy from numpy)."""
    return cond_map(cond, torch.from_numpy)


def cond_batch(cond) -> int:
    """Batch size of a condition."""
    return int(next(iter(as_dict(cond).values())).shape[0])


def call_denoiser(model, x_t: torch.Tensor, t: torch.Tensor, **kwargs):
    """``model(x_t, t, **kwargs)``, with ``t`` by keyword (``timestep=``) for a denoiser whose forward takes the
    text before the timestep (SD3's MMDiT: ``(hidden_states, encoder_hidden_states, pooled_projections,
    timestep)``; a multi-student model of them, or either wrapped by DDP), positionally for every other one (UNets,
    DiT, a factory's ``model(x, t)``)."""
    cfg = getattr(getattr(model, "module", model), "config", None)
    if hasattr(cfg, "get") and cfg.get("joint_attention_dim") is not None:
        return model(x_t, timestep=t, **kwargs)
    return model(x_t, t, **kwargs)
