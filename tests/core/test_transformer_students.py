"""Transformer students (DiT, SD3): kept blocks, sliced heads, exact copies at full size, and their params / MACs
under the cost definition the UNets use."""

import pytest
import torch
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DModel

from o2mkd_ray.core.costs import count_macs, count_params, forward_cost
from o2mkd_ray.core.transformer_students import (
    build_transformer_student,
    kept_blocks,
    transformer_student_config,
)
from o2mkd_ray.errors import ConfigError


def tiny_dit(num_layers=4):
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
                                 num_layers=num_layers, sample_size=8, patch_size=2).eval()


def tiny_sd3(num_layers=4, dual=()):
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
                                 attention_head_dim=8, num_attention_heads=4, joint_attention_dim=48,
                                 caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=8,
                                 dual_attention_layers=dual).eval()


def inputs(model, batch=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, model.config.in_channels, 8, 8, generator=g)
    t = torch.tensor([900.22, 37.0][:batch])
    if isinstance(model, DiTTransformer2DModel):
        return x, {"timestep": t, "class_labels": torch.tensor([3, 1000][:batch])}
    return x, {"timestep": t, "encoder_hidden_states": torch.randn(batch, 5, 48, generator=g),
               "pooled_projections": torch.randn(batch, 32, generator=g)}


def run(model, x, kw):
    with torch.no_grad():
        return model(x, **kw).sample


def block(model, i):
    return model.transformer_blocks[i].state_dict()


@pytest.mark.parametrize("n_t,n_s,want", [(28, 14, [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27]),
                                          (4, 2, [0, 3]), (4, 4, [0, 1, 2, 3]), (3, 1, [2]), (24, 3, [0, 12, 23])])
def test_kept_blocks_are_evenly_spaced_and_keep_the_last(n_t, n_s, want):
    assert kept_blocks(n_t, n_s) == want


@pytest.mark.parametrize("make", [tiny_dit, tiny_sd3])
def test_full_size_student_is_an_exact_copy(make):
    teacher = make()
    student = build_transformer_student(teacher, depth=1.0, width=1.0)
    assert student.config.num_layers == teacher.config.num_layers
    x, kw = inputs(teacher)
    assert torch.equal(run(student, x, kw), run(teacher, x, kw))


@pytest.mark.parametrize("make", [tiny_dit, tiny_sd3])
def test_half_depth_student_copies_the_kept_blocks(make):
    teacher = make()
    student = build_transformer_student(teacher, depth=0.5)
    assert student.config.num_layers == 2 and student.config.num_attention_heads == 4
    for i, j in enumerate([0, 3]):
        s, t = block(student, i), block(teacher, j)
        assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s), (i, j)
    if isinstance(teacher, SD3Transformer2DModel):  # the kept last block still ends the text stream
        assert student.transformer_blocks[-1].context_pre_only
    x, kw = inputs(teacher)
    out = run(student, x, kw)
    assert out.shape == run(teacher, x, kw).shape and torch.isfinite(out).all()


@pytest.mark.parametrize("make", [tiny_dit, tiny_sd3])
def test_half_width_student_slices_heads_and_modulation_chunks(make):
    teacher = make()
    student = build_transformer_student(teacher, width=0.5)
    d_t, d_s = 32, 16  # inner dim = heads * head_dim: 4 * 8 -> 2 * 8
    assert student.config.num_attention_heads == 2 and student.config.attention_head_dim == 8
    attn = "attn1" if isinstance(teacher, DiTTransformer2DModel) else "attn"
    s, t = block(student, 1), block(teacher, 1)
    assert torch.equal(s[f"{attn}.to_q.weight"], t[f"{attn}.to_q.weight"][:d_s, :d_s])  # the first 2 heads
    assert torch.equal(s[f"{attn}.to_out.0.weight"], t[f"{attn}.to_out.0.weight"][:d_s, :d_s])
    # adaLN-Zero packs 6 chunks (shift, scale, gate for attention and MLP): each chunk sliced on its own
    mod_s, mod_t = s["norm1.linear.weight"], t["norm1.linear.weight"]  # (6 * d, d)
    assert mod_s.shape == (6 * d_s, d_s)
    for c in range(6):
        assert torch.equal(mod_s[c * d_s:(c + 1) * d_s], mod_t[c * d_t:c * d_t + d_s, :d_s]), c
    if isinstance(teacher, SD3Transformer2DModel):
        assert student.config.caption_projection_dim == d_s
    x, kw = inputs(teacher)
    out = run(student, x, kw)
    assert out.shape == run(teacher, x, kw).shape and torch.isfinite(out).all()


def test_sd35_dual_attention_layers_follow_the_kept_blocks():
    cfg, kept = transformer_student_config(tiny_sd3(num_layers=4, dual=(0, 1)).config, depth=0.5)
    assert kept == [0, 3] and cfg["dual_attention_layers"] == [0]
    teacher = tiny_sd3(num_layers=4, dual=(0, 1))
    student = build_transformer_student(teacher, depth=0.5)
    assert torch.equal(block(student, 0)["attn2.to_q.weight"], block(teacher, 0)["attn2.to_q.weight"])


@pytest.mark.parametrize("kwargs,words", [({"depth": 0.0}, "students.depth"), ({"width": 1.5}, "students.width"),
                                          ({"init": "zeros"}, "students.init")])
def test_bad_options_are_one_line_config_errors(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        build_transformer_student(tiny_dit(), **kwargs)


def test_a_unet_is_not_a_transformer_teacher():
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(ConfigError, match="not a transformer teacher"):
        build_transformer_student(unet)


# ------------------------------------------------------------------------------------------------ costs


def test_dit_macs_count_every_block_with_its_attention():
    """One DiT block at 16 tokens of width 32, by hand: q/k/v/out 4·N·D², scores and values 2·N²·D, MLP 8·N·D²,
    adaLN-Zero D·6D and the block's own timestep MLP 256·D + D² (class embedding: a lookup, no MACs)."""
    n, d = 16, 32
    per_block = 4 * n * d * d + 2 * n * n * d + 8 * n * d * d + 6 * d * d + 256 * d + d * d
    teacher = tiny_dit(num_layers=4)
    three = build_transformer_student(teacher, depth=0.75)
    assert count_macs(teacher) - count_macs(three) == per_block
    cost = forward_cost(teacher, (4, 8, 8))
    assert cost == {"params": count_params(teacher), "macs": count_macs(teacher)}


def test_sd3_macs_use_its_signature_and_grow_with_text_and_shrink_with_students():
    teacher = tiny_sd3()
    macs = count_macs(teacher)  # SD3's forward takes encoder_hidden_states second: timestep goes by keyword
    assert count_macs(teacher, seq_len=154) > macs  # joint attention sees the text tokens
    half_depth = build_transformer_student(teacher, depth=0.5)
    half_width = build_transformer_student(teacher, width=0.5)
    assert count_macs(half_depth) < macs and count_macs(half_width) < macs / 2.5  # width: ~quadratic
    assert count_params(half_width) < count_params(teacher) / 2.5
    _, kw = inputs(teacher, batch=1)
    given = count_macs(teacher, encoder_hidden_states=kw["encoder_hidden_states"],
                       pooled_projections=kw["pooled_projections"])
    assert given == count_macs(teacher, seq_len=5)  # the stand-ins have the real inputs' shapes
