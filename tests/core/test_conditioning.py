"""One conditioning value from the data to the UNet: SD's text embeddings and SDXL's dict behave the same through
batching, dropout and the UNet call."""

import numpy as np
import pytest
import torch

from o2mkd_ray.core.conditioning import (
    cond_batch,
    cond_cat,
    cond_key,
    cond_kwargs,
    cond_slice,
    cond_where,
    from_items,
    to_numpy,
    to_torch,
)


def _sdxl(b: int, fill: float = 1.0) -> dict:
    return {"encoder_hidden_states": torch.full((b, 3, 4), fill), "text_embeds": torch.full((b, 5), fill),
            "time_ids": torch.full((b, 6), fill)}


def test_sd_condition_is_the_bare_text_embedding():
    e = torch.randn(2, 3, 4)
    assert from_items([e]) is e
    assert set(cond_kwargs(e)) == {"encoder_hidden_states"}
    assert from_items([]) is None and cond_kwargs(None) == {}


def test_sdxl_condition_reaches_the_unet_as_added_cond_kwargs():
    c = from_items([torch.zeros(2, 3, 4), torch.ones(2, 5), torch.ones(2, 6)])
    kw = cond_kwargs(c, dtype=torch.float64)
    assert set(kw) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert set(kw["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    assert kw["added_cond_kwargs"]["time_ids"].dtype == torch.float64


@pytest.mark.parametrize("form", ["sd", "sdxl"])
def test_batching_round_trip_through_numpy(form):
    a, b = (torch.randn(2, 3, 4), torch.randn(3, 3, 4)) if form == "sd" else (_sdxl(2, 1.0), _sdxl(3, 2.0))
    na, nb = to_numpy(a), to_numpy(b)
    assert cond_key(na) == cond_key(nb)  # same per-sample shapes: one forward may merge them
    merged = cond_cat([na, nb])
    assert cond_batch(merged) == 5
    back = to_torch(cond_slice(merged, 2, 5))
    want = b if form == "sd" else b["time_ids"]
    got = back if form == "sd" else back["time_ids"]
    assert torch.equal(got, want)


def test_batching_keeps_sd_and_sdxl_requests_apart():
    sd = to_numpy(torch.zeros(1, 3, 4))
    xl = to_numpy(_sdxl(1))
    assert cond_key(sd) != cond_key(xl)
    assert cond_key(to_numpy(torch.zeros(1, 7, 4))) != cond_key(sd)  # another text length
    assert cond_key(None) is None


@pytest.mark.parametrize("form", ["sd", "sdxl"])
def test_condition_dropout_swaps_whole_samples(form):
    cond = torch.ones(4, 3, 4) if form == "sd" else _sdxl(4, 1.0)
    uncond = torch.zeros(1, 3, 4) if form == "sd" else _sdxl(1, 0.0)
    drop = torch.tensor([True, False, True, False])
    out = cond_where(drop, uncond, cond)
    for entry in ([out] if form == "sd" else out.values()):
        flat = entry.reshape(4, -1)
        assert torch.equal(flat[:, 0], torch.tensor([0.0, 1.0, 0.0, 1.0]))
        assert (flat == flat[:, :1]).all()  # a sample is dropped whole, every entry of it


def test_numpy_concatenation_keeps_arrays():
    merged = cond_cat([to_numpy(_sdxl(1)), to_numpy(_sdxl(2))])
    assert isinstance(merged["text_embeds"], np.ndarray) and merged["text_embeds"].shape == (3, 5)
