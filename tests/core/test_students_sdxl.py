"""Students of an SDXL UNet (text_time added conditioning, transformer_layers_per_block): width, BK-SDM and
KOALA-style depth, teacher init, and params/MACs with SDXL's added conditioning."""

import pytest
import torch
from conftest import tiny_unet
from diffusers import UNet2DConditionModel

from o2mkd_ray.core.costs import count_params, forward_cost
from o2mkd_ray.core.student_config import make_unet, student_config
from o2mkd_ray.core.student_init import init_from_teacher
from o2mkd_ray.core.students import build_student
from o2mkd_ray.errors import ConfigError

SHAPE = (4, 8, 8)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (keys at their defaults omitted), for meta-device checks
SDXL_BASE = {
    "_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "in_channels": 4,
    "layers_per_block": 2, "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}


@pytest.fixture(scope="module")
def teacher(tiny_sdxl_dir):
    return UNet2DConditionModel.from_pretrained(tiny_sdxl_dir / "unet").eval()


def inputs(batch=2):
    g = torch.Generator().manual_seed(5)
    return {"sample": torch.randn(batch, *SHAPE, generator=g), "timestep": torch.tensor([10, 900][:batch]),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g),  # (B, L, D1 + D2)
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, 16, generator=g),  # (B, pooled)
                                  "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]] * batch)}}  # (B, 6)


def depths(unet) -> dict:
    """Transformer layers of every attention block, by block."""
    out = {f"down{i}": [len(a.transformer_blocks) for a in getattr(b, "attentions", [])]
           for i, b in enumerate(unet.down_blocks)}
    out.update({f"up{i}": [len(a.transformer_blocks) for a in getattr(b, "attentions", [])]
                for i, b in enumerate(unet.up_blocks)})
    out["mid"] = [len(a.transformer_blocks) for a in unet.mid_block.attentions] if unet.mid_block else []
    return out


def sliced(t, like):
    return t[tuple(slice(0, d) for d in like.shape)]


def test_width_one_same_depth_is_exact_copy(teacher):
    student = build_student(teacher, width=1.0).eval()
    assert init_from_teacher(student, teacher) == len(teacher.state_dict())
    with torch.no_grad():
        assert torch.equal(student(**inputs()).sample, teacher(**inputs()).sample)


def test_koala_student_has_fewer_transformer_layers_copied_from_the_teacher(teacher):
    assert depths(teacher) == {"down0": [], "down1": [2, 2], "up0": [2, 2, 2], "up1": [], "mid": [2]}
    student = build_student(teacher, width=0.5, transformer_layers_per_block=[1, 1])
    assert depths(student) == {"down0": [], "down1": [1, 1], "up0": [1, 1, 1], "up1": [], "mid": [1]}
    assert list(student.config.block_out_channels) == [8, 16]
    assert student.config.addition_embed_type == "text_time"  # added conditioning and text width kept
    assert student.config.projection_class_embeddings_input_dim == teacher.config.projection_class_embeddings_input_dim
    assert student.config.cross_attention_dim == 32
    sd_s, sd_t = student.state_dict(), teacher.state_dict()
    for name in ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                 "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
                 "mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight",
                 "up_blocks.0.attentions.2.transformer_blocks.0.norm1.weight",
                 "add_embedding.linear_1.weight", "conv_in.weight"):
        assert torch.equal(sd_s[name], sliced(sd_t[name], sd_s[name])), name
    with torch.no_grad():
        assert student(**inputs()).sample.shape == (2, *SHAPE)
    full = forward_cost(teacher, SHAPE, seq_len=7)
    small = forward_cost(student, SHAPE, seq_len=7)
    shallow = forward_cost(build_student(teacher, width=1.0, transformer_layers_per_block=1), SHAPE, seq_len=7)
    assert small["params"] < shallow["params"] < full["params"]
    assert small["macs"] < shallow["macs"] < full["macs"]


def test_bk_sdm_student_on_sdxl(teacher):
    student = build_student(teacher, width=0.5, layers_per_block=1, drop_mid_block=True)
    assert student.mid_block is None
    assert [len(b.resnets) for b in student.down_blocks] == [1, 1]
    assert [len(b.resnets) for b in student.up_blocks] == [2, 2]
    assert depths(student)["up0"] == [2, 2]  # the teacher's transformer depth, in fewer attention blocks
    sd_s, sd_t = student.state_dict(), teacher.state_dict()
    pairs = {"up_blocks.0.attentions.1.proj_in.weight": "up_blocks.0.attentions.2.proj_in.weight",
             "up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_v.weight":
                 "up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_v.weight",
             "down_blocks.1.resnets.0.conv1.weight": "down_blocks.1.resnets.0.conv1.weight"}
    for s_name, t_name in pairs.items():
        assert torch.equal(sd_s[s_name], sliced(sd_t[t_name], sd_s[s_name])), s_name
    with torch.no_grad():
        assert student(**inputs()).sample.shape == (2, *SHAPE)
    assert forward_cost(student, SHAPE)["macs"] < forward_cost(teacher, SHAPE)["macs"]


def test_forward_cost_takes_added_cond_kwargs(teacher):
    x = inputs(batch=1)
    given = forward_cost(teacher, SHAPE, encoder_hidden_states=x["encoder_hidden_states"],
                         added_cond_kwargs=x["added_cond_kwargs"])
    assert given == forward_cost(teacher, SHAPE, seq_len=7)  # zero stand-ins of the same shapes
    assert given["params"] == count_params(teacher) and given["macs"] > 0
    assert forward_cost(teacher, SHAPE)["macs"] > given["macs"]  # 77 stand-in tokens: longer cross-attention


def test_sdxl_base_students_on_meta():
    with torch.device("meta"):
        big = make_unet(SDXL_BASE, "teacher")
        koala = make_unet(student_config(SDXL_BASE, 1.0, layers_per_block=1, drop_mid_block=True,
                                         transformer_layers_per_block=[1, 2, 5]), "students.width")
        half = make_unet(student_config(SDXL_BASE, 0.5), "students.width")
    assert count_params(big) == 2_567_463_684  # SDXL-base's published UNet size
    assert depths(koala)["down2"] == [5] and depths(koala)["up0"] == [5, 5] and koala.mid_block is None
    assert half.down_blocks[1].attentions[0].transformer_blocks[0].attn1.heads == 10  # 320 channels, 10 heads
    assert count_params(half) < count_params(koala) < count_params(big)  # MACs at this shape: benchmarks/sdxl_macs.py


def test_transformer_depth_errors(teacher):
    with pytest.raises(ConfigError, match=r"transformer_layers_per_block: only UNet2DConditionModel"):
        student_config(tiny_unet().config, 0.5, transformer_layers_per_block=1)
    with pytest.raises(ConfigError, match=r">= 1, got \[1, 0\]"):
        build_student(teacher, transformer_layers_per_block=[1, 0])
    with pytest.raises(ConfigError, match=r"got 3 values for 2 down blocks; give one value or 2"):
        build_student(teacher, transformer_layers_per_block=[1, 1, 1])  # diffusers itself would not complain
    with pytest.raises(ConfigError, match="reverse_transformer_layers_per_block"):
        student_config(dict(SDXL_BASE, reverse_transformer_layers_per_block=[[10, 10, 10], [2, 2, 2], [1, 1, 1]]),
                       1.0, transformer_layers_per_block=[1, 2, 5])
