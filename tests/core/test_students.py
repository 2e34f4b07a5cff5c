"""Student construction: width scaling, teacher-slice init, explicit configs, cost counting."""

import pytest
import torch
from conftest import tiny_unet
from diffusers import UNet2DModel
from torch import nn

from o2mkd_ray.config.schema import Config, StudentsConfig, TrainConfig
from o2mkd_ray.core.costs import count_macs, count_params
from o2mkd_ray.core.student_config import student_config
from o2mkd_ray.core.student_init import init_from_teacher
from o2mkd_ray.core.students import build_student, build_students
from o2mkd_ray.errors import ConfigError

# google/ddpm-cifar10-32's UNet config (35.7M parameters), written out so the test needs no download
CIFAR = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 32,
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "act_fn": "silu",
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "_class_name": "UNet2DModel",
    "_diffusers_version": "0.0.4",
}


def tiny_teacher() -> UNet2DModel:
    return tiny_unet(in_channels=3, seed=0)


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


@pytest.mark.parametrize("width", [0.25, 0.3, 0.5, 0.75, 1.0])
def test_width_scaling_keeps_groups_and_blocks(width):
    cfg = student_config(CIFAR, width)
    groups = cfg["norm_num_groups"]
    assert not any(k.startswith("_") for k in cfg)
    assert all(c > 0 and c % groups == 0 for c in cfg["block_out_channels"])
    for c_s, c_t in zip(cfg["block_out_channels"], CIFAR["block_out_channels"]):
        assert abs(c_s - width * c_t) <= groups / 2  # nearest multiple of the group count
    assert cfg["down_block_types"] == CIFAR["down_block_types"]
    assert cfg["up_block_types"] == CIFAR["up_block_types"]
    if width == 1.0:
        assert cfg["block_out_channels"] == CIFAR["block_out_channels"] and groups == 32


def test_small_width_reduces_groups_and_head_dim():
    cfg = student_config(tiny_teacher().config, 0.25, layers_per_block=2)
    assert cfg["block_out_channels"] == [1, 2] and cfg["norm_num_groups"] == 1  # 4*0.25 = 1 < 2 groups
    assert cfg["layers_per_block"] == 2
    # the attention block has 2 channels: a head dim of 4 would give 0 heads
    assert 2 % cfg["attention_head_dim"] == 0
    out = UNet2DModel(**cfg)(torch.randn(1, 3, 8, 8), 10).sample
    assert out.shape == (1, 3, 8, 8)


def test_zero_channel_width_raises():
    with pytest.raises(ConfigError, match=r"students\.width: .*at least"):
        student_config(CIFAR, 0.001)


def test_student_forward_and_params_shrink(teacher):
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    params = []
    for width in (0.5, 1.0):
        student = build_student(teacher, width=width)
        assert student(x_t, t).sample.shape == (2, 3, 8, 8)
        params.append(count_params(student))
    assert params[0] < params[1] == count_params(teacher)


def test_width_one_teacher_init_is_exact_copy(teacher):
    student = build_student(teacher, width=1.0, init="teacher").eval()  # same mode: same SDPA kernel path
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 900])
    with torch.no_grad():
        assert torch.equal(student(x_t, t).sample, teacher(x_t, t).sample)


def test_teacher_slice_init_copies_leading_slices(teacher):
    torch.manual_seed(1)
    student = build_student(teacher, width=0.5, init="scratch")
    assert not torch.equal(student.conv_in.weight, teacher.conv_in.weight[:2])
    n = init_from_teacher(student, teacher)
    assert n == len(student.state_dict())  # same layout, every tensor fits in the teacher's
    for name in (
        "conv_in.weight",
        "down_blocks.1.resnets.0.conv1.weight",
        "up_blocks.0.attentions.0.to_q.weight",
    ):
        s, t = student.get_parameter(name), teacher.get_parameter(name)
        assert s.shape != t.shape
        assert torch.equal(s, t[tuple(slice(0, d) for d in s.shape)])


def test_non_unet_teacher_needs_students_unet():
    class Net(nn.Module):
        def forward(self, x, t):
            return x

    with pytest.raises(ConfigError, match=r"students\.unet"):
        build_student(Net(), width=0.5)
    explicit = {
        "sample_size": 8,
        "in_channels": 3,
        "out_channels": 3,
        "layers_per_block": 1,
        "block_out_channels": [4, 8],
        "norm_num_groups": 2,
        "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"],
    }
    student = build_student(Net(), width=0.5, unet_config=explicit)  # explicit config is used as given
    assert list(student.config.block_out_channels) == [4, 8]
    assert list(student.config.down_block_types) == ["DownBlock2D", "DownBlock2D"]
    with pytest.raises(ConfigError, match=r"students\.unet: unknown"):
        build_student(Net(), unet_config=dict(explicit, bogus=1))


def test_build_students_per_segment_and_seeded(teacher):
    cfg = Config(
        students=StudentsConfig(width=[0.5, 1.0], layers_per_block=[1, 2], init="scratch"),
        train=TrainConfig(seed=3),
    )
    a = build_students(cfg, teacher, 2)
    assert [list(s.config.block_out_channels) for s in a] == [[2, 4], [4, 8]]
    assert [s.config.layers_per_block for s in a] == [1, 2]
    b = build_students(cfg, teacher, 2)
    assert torch.equal(a[0].conv_in.weight, b[0].conv_in.weight)  # seed + k: reproducible
    with pytest.raises(ConfigError, match=r"students\.width: got 2 values for 3"):
        build_students(cfg, teacher, 3)


def test_count_macs(teacher):
    assert count_macs(teacher) > count_macs(build_student(teacher, width=0.5)) > 0
    conv = nn.Conv2d(3, 5, 3, padding=1)
    macs = count_macs(lambda_module(conv), sample_shape=(1, 3, 8, 8))
    assert macs == 8 * 8 * 5 * 3 * 9  # a plain model(x, t) module
    with torch.device("meta"):  # shapes only: the 35.7M-parameter teacher costs no memory or compute
        big, half = (
            UNet2DModel(**{k: v for k, v in CIFAR.items() if k[0] != "_"}),
            UNet2DModel(**student_config(CIFAR, 0.5)),
        )
    assert count_params(big) == 35_746_307
    ratio = count_macs(half) / count_macs(big)
    assert 0.2 < ratio < 0.35  # convolutions scale with width²


def lambda_module(conv: nn.Module) -> nn.Module:
    class XT(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv

        def forward(self, x, t):
            return self.conv(x)

    return XT()
