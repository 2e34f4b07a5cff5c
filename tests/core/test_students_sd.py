"""Students of a Stable Diffusion UNet2DConditionModel: width scaling, BK-SDM depth pruning and init, cost."""

import pytest
import torch
from conftest import tiny_unet
from diffusers import UNet2DConditionModel, UNet2DModel

from o2mkd_ray.config.schema import Config, StudentsConfig, TrainConfig
from o2mkd_ray.core.costs import count_macs, count_params
from o2mkd_ray.core.student_config import make_unet, student_config, teacher_unet_config
from o2mkd_ray.core.student_init import init_from_teacher
from o2mkd_ray.core.students import build_student, build_students
from o2mkd_ray.errors import ConfigError

# runwayml/stable-diffusion-v1-5 unet/config.json (859.5M parameters), written out so the test needs no download
SD15 = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

TEXT_LEN, TEXT_DIM = 5, 16


def tiny_sd_unet() -> UNet2DConditionModel:
    """The UNet of o2mkd_ray.core.fixtures.make_tiny_sd (SD 1.x layout at toy size), in eval mode."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[16, 32],
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=TEXT_DIM, attention_head_dim=2, norm_num_groups=4,
    ).eval()


@pytest.fixture(scope="module")
def teacher():
    return tiny_sd_unet()


def _inputs(batch=2):
    g = torch.Generator().manual_seed(7)
    x_t = torch.randn(batch, 4, 8, 8, generator=g)
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)  # (B, L, D)
    return x_t, torch.tensor([10, 900][:batch]), text


def _sliced(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t[tuple(slice(0, d) for d in like.shape)]


def test_half_width_student_forwards_with_text(teacher):
    student = build_student(teacher, width=0.5)
    assert isinstance(student, UNet2DConditionModel)
    assert list(student.config.block_out_channels) == [8, 16]
    assert student.config.cross_attention_dim == TEXT_DIM  # the text encoder is shared with the teacher
    x_t, t, text = _inputs()
    assert student(x_t, t, encoder_hidden_states=text).sample.shape == (2, 4, 8, 8)
    assert count_params(student) < count_params(teacher)


def test_width_one_same_depth_is_exact_copy(teacher):
    student = build_student(teacher, width=1.0).eval()
    assert init_from_teacher(student, teacher) == len(teacher.state_dict())
    x_t, t, text = _inputs()
    with torch.no_grad():
        assert torch.equal(
            student(x_t, t, encoder_hidden_states=text).sample, teacher(x_t, t, encoder_hidden_states=text).sample
        )


def test_bk_sdm_student_is_smaller_and_holds_mapped_teacher_weights(teacher):
    student = build_student(teacher, width=0.5, layers_per_block=1, drop_mid_block=True)
    assert student.mid_block is None and student.config.mid_block_type is None
    assert [len(b.resnets) for b in student.down_blocks] == [1, 1]
    assert [len(b.resnets) for b in student.up_blocks] == [2, 2]  # layers_per_block + 1 in up blocks
    assert count_params(student) < count_params(teacher)
    assert count_macs(student, seq_len=TEXT_LEN) < count_macs(teacher, seq_len=TEXT_LEN)
    x_t, t, text = _inputs()
    assert student(x_t, t, encoder_hidden_states=text).sample.shape == (2, 4, 8, 8)
    sd_s, sd_t = student.state_dict(), teacher.state_dict()
    pairs = {  # student tensor <- teacher tensor (BK-SDM: down j <- j; up: first <- first, last <- last)
        "conv_in.weight": "conv_in.weight",
        "down_blocks.0.resnets.0.conv1.weight": "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight":
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.1.resnets.0.conv2.weight": "down_blocks.1.resnets.0.conv2.weight",
        "up_blocks.0.resnets.0.conv1.weight": "up_blocks.0.resnets.0.conv1.weight",
        "up_blocks.0.resnets.1.conv1.weight": "up_blocks.0.resnets.2.conv1.weight",
        "up_blocks.1.resnets.1.conv_shortcut.weight": "up_blocks.1.resnets.2.conv_shortcut.weight",
        "up_blocks.1.attentions.1.proj_in.weight": "up_blocks.1.attentions.2.proj_in.weight",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight":
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    }
    for s_name, t_name in pairs.items():
        s = sd_s[s_name]
        assert torch.equal(s, _sliced(sd_t[t_name], s)), s_name
    # the last up resnet takes the previous stage's skip: only teacher resnets.2 has its input shape at width 1
    full = build_student(teacher, width=1.0, layers_per_block=1, init="scratch")
    conv1 = full.up_blocks[0].resnets[1].conv1.weight
    assert [teacher.up_blocks[0].resnets[k].conv1.weight.shape == conv1.shape for k in range(3)] == [
        False, False, True]
    assert init_from_teacher(full, teacher) == len(full.state_dict())  # every kept tensor has an exact-shape source
    for name, s in full.state_dict().items():
        if name.startswith("up_blocks.0.resnets.1."):
            assert torch.equal(s, sd_t[name.replace("resnets.1.", "resnets.2.")])


def test_sd15_students_on_meta_are_valid_and_cheaper(capsys):
    with torch.device("meta"):
        big = make_unet(SD15, "teacher")
        variants = {
            "w0.5": student_config(SD15, 0.5),
            "w0.75": student_config(SD15, 0.75),
            "bk_base": student_config(SD15, 1.0, layers_per_block=1),
            "bk_small": student_config(SD15, 1.0, layers_per_block=1, drop_mid_block=True),
            "w0.5_bk_small": student_config(SD15, 0.5, layers_per_block=1, drop_mid_block=True),
        }
        models = {k: make_unet(v, "students.width") for k, v in variants.items()}
    assert count_params(big) == 859_520_964
    for k, cfg in variants.items():
        assert cfg["cross_attention_dim"] == 768 and cfg["attention_head_dim"] == 8, k
        assert isinstance(models[k], UNet2DConditionModel)
        # legacy naming: attention_head_dim=8 is the head count, kept at every width
        assert models[k].down_blocks[0].attentions[0].transformer_blocks[0].attn1.heads == 8
    assert variants["w0.5"]["block_out_channels"] == [160, 320, 640, 640]
    assert variants["w0.75"]["block_out_channels"] == [256, 480, 960, 960]
    # BK-SDM's published sizes (Base 0.58B, Small 0.49B of SD's 0.86B)
    assert count_params(models["bk_base"]) == 579_384_964
    assert count_params(models["bk_small"]) == 482_346_884
    assert models["bk_small"].mid_block is None
    macs_t = count_macs(big)
    ratio = {k: count_macs(m) / macs_t for k, m in models.items()}
    with capsys.disabled():
        print(f"\nSD1.5 teacher {macs_t / 1e9:.1f} GMACs; student/teacher MAC ratios: "
              + ", ".join(f"{k} {r:.3f}" for k, r in ratio.items()))
    assert 0.2 < ratio["w0.5"] < ratio["w0.75"] < 1
    assert ratio["bk_small"] < ratio["bk_base"] < 1
    assert ratio["w0.5_bk_small"] < ratio["w0.5"]


def test_head_counts_reduced_only_where_needed():
    sd2 = dict(SD15, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, use_linear_projection=True)
    cfg = student_config(sd2, 0.75)
    assert cfg["block_out_channels"] == [256, 480, 960, 960]
    assert cfg["attention_head_dim"] == [4, 10, 20, 20]  # 256 channels cannot hold 5 heads
    with torch.device("meta"):
        m = make_unet(cfg, "students.width")
    assert m.up_blocks[3].attentions[0].transformer_blocks[0].attn1.heads == 4  # up blocks read reversed heads
    tiny = dict(SD15, block_out_channels=[40, 80], attention_head_dim=5, norm_num_groups=4,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    cfg = student_config(tiny, 0.75)
    assert cfg["block_out_channels"] == [32, 60] and cfg["attention_head_dim"] == 4  # largest divisor of gcd 4
    assert student_config(tiny, 0.5)["attention_head_dim"] == 5  # [20, 40]: 5 heads still fit


def test_per_block_layers_and_config_detection(teacher):
    tcfg = teacher_unet_config(teacher)
    assert tcfg["cross_attention_dim"] == TEXT_DIM and not any(k.startswith("_") for k in tcfg)
    student = build_student(teacher, width=0.5, layers_per_block=[1, 2])
    assert [len(b.resnets) for b in student.down_blocks] == [1, 2]
    x_t, t, text = _inputs()
    assert student(x_t, t, encoder_hidden_states=text).sample.shape == (2, 4, 8, 8)
    with pytest.raises(ConfigError, match=r"students\.width: UNet2DConditionModel rejected"):
        build_student(teacher, layers_per_block=[1, 1, 1])  # one count per down block
    with pytest.raises(ConfigError, match=r"students\.unet: unknown UNet2DConditionModel keys \['bogus'\]"):
        make_unet(dict(SD15, bogus=1), "students.unet")
    cfg = {k: v for k, v in SD15.items() if k != "cross_attention_dim"}  # only _class_name says it is conditional
    assert student_config(cfg, 0.5)["cross_attention_dim"] == 1280  # diffusers' default, written out
    # UNet2DModel: mid_block_type=None is supported by this diffusers, a per-block layer list is not
    small = build_student(tiny_unet(in_channels=3), width=0.5, drop_mid_block=True)
    assert isinstance(small, UNet2DModel) and small.mid_block is None
    assert small(torch.randn(1, 3, 8, 8), 5).sample.shape == (1, 3, 8, 8)
    with pytest.raises(ConfigError, match=r"students\.layers_per_block: UNet2DModel"):
        student_config(tiny_unet().config, 0.5, layers_per_block=[1, 1])


def test_build_students_drop_mid_block(teacher):
    cfg = Config(
        students=StudentsConfig(width=[0.5, 1.0], layers_per_block=1, drop_mid_block=True),
        train=TrainConfig(seed=0),
    )
    students = build_students(cfg, teacher, 2)
    assert all(s.mid_block is None for s in students)
    assert [list(s.config.block_out_channels) for s in students] == [[8, 16], [16, 32]]


def test_count_macs_text_stand_in(teacher):
    x_t, t, text = _inputs(batch=1)
    explicit = count_macs(teacher, encoder_hidden_states=text)  # (1, 5, 16)
    assert count_macs(teacher, seq_len=TEXT_LEN) == explicit
    assert count_macs(teacher) > explicit  # default seq_len=77: longer cross-attention


def test_zero_channel_width_raises():
    with pytest.raises(ConfigError, match=r"students\.width: .*at least") as e:
        student_config(SD15, 0.001)
    assert "\n" not in str(e.value)
