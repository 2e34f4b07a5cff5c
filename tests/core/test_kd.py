"""KD losses: output KD, feature hooks, FitNet and attention transfer, the method registry."""

import pytest
import torch
from conftest import tiny_unet
from torch import nn

from o2mkd_ray.config.schema import KDConfig
from o2mkd_ray.core.features import FeatureHooks, hookable_blocks, probe_feature_channels
from o2mkd_ray.core.kd import KD_METHODS, AttentionTransferKD, FeatureKD, KDLoss, register_kd
from o2mkd_ray.core.students import build_student
from o2mkd_ray.errors import ConfigError

BLOCKS = ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]


@pytest.fixture(scope="module")
def teacher():
    return tiny_unet(in_channels=3, seed=0)


@pytest.fixture(scope="module")
def student(teacher):
    torch.manual_seed(1)
    return build_student(teacher, width=0.5)


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 600]), torch.randn(2, 3, 8, 8, generator=g)


def test_hooks_collect_block_outputs(teacher):
    assert hookable_blocks(teacher) == BLOCKS
    assert hookable_blocks(nn.Conv2d(1, 1, 1)) == []
    x_t, t, _ = batch()
    with FeatureHooks(teacher) as hooks:
        teacher(x_t, t)
    feats = hooks.features
    assert list(feats) == BLOCKS
    assert feats["down_blocks.0"].shape == (2, 4, 4, 4)  # element 0 of (hidden_states, res_samples)
    assert feats["mid_block"].shape == (2, 8, 4, 4) and feats["up_blocks.1"].shape == (2, 4, 8, 8)
    hooks.clear()
    teacher(x_t, t)  # removed on exit: nothing is stored any more
    assert hooks.features == {}
    assert probe_feature_channels(teacher, (1, 3, 8, 8)) == dict(zip(BLOCKS, [4, 8, 8, 8, 4]))
    with pytest.raises(ValueError, match="hookable"):
        FeatureHooks(teacher, ["nope"])


def test_output_kd_zero_for_identical_and_positive_otherwise(teacher, student):
    x_t, t, eps = batch()
    kd = KDLoss(KDConfig(lambda_out=1.0, lambda_feat=0.0, lambda_task=0.5))
    assert not kd.uses_features
    with torch.no_grad():
        eps_t = teacher(x_t, t).sample
        same = teacher(x_t, t).sample
        eps_s = student(x_t, t).sample
    _loss, terms = kd(same, eps_t, eps)
    assert terms["loss_out"] == 0.0
    assert terms["loss_task"] == pytest.approx(((same - eps) ** 2).mean().item())
    assert terms["loss"] == pytest.approx(0.5 * terms["loss_task"])
    _, terms = kd(eps_s, eps_t, eps)
    assert terms["loss_out"] > 0 and terms["loss_feat"] == 0.0


def test_fitnet_adapters_and_gradients(teacher, student):
    s_ch, t_ch = probe_feature_channels(student, (1, 3, 8, 8)), probe_feature_channels(teacher, (1, 3, 8, 8))
    kd = KDLoss(KDConfig(lambda_out=0.0, lambda_feat=1.0, feature_method="fitnet"), s_ch, t_ch)
    assert kd.uses_features and kd.blocks == BLOCKS
    for b in BLOCKS:
        conv = kd.feature.adapter(b)
        assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (s_ch[b], t_ch[b], (1, 1))
    assert {n for n, _ in kd.named_parameters()} >= {"feature.adapters.mid_block.weight"}
    x_t, t, eps = batch()
    with torch.no_grad(), FeatureHooks(teacher, kd.blocks) as th:
        eps_t = teacher(x_t, t).sample
    student.zero_grad()
    with FeatureHooks(student, kd.blocks) as sh:
        eps_s = student(x_t, t).sample
    loss, terms = kd(eps_s, eps_t, eps, sh.features, th.features)
    assert terms["loss_feat"] > 0 and terms["loss"] == pytest.approx(terms["loss_feat"])
    loss.backward()  # feature term only (lambda_out = 0): gradients reach the student through the hooks
    assert student.conv_in.weight.grad is not None and student.conv_in.weight.grad.abs().sum() > 0
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in kd.named_parameters() if "weight" in n
    )


def test_attention_transfer():
    at = AttentionTransferKD({"b": 2}, {"b": 8})  # different channel counts, no adapters
    assert list(at.parameters()) == []
    g = torch.Generator().manual_seed(0)
    f_t, f_s = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    same = AttentionTransferKD({"b": 8}, {"b": 8})
    assert same({"b": f_t}, {"b": f_t}).item() == 0.0
    assert same({"b": 3.0 * f_t}, {"b": f_t}).item() == pytest.approx(0.0, abs=1e-12)  # scale-invariant
    base = at({"b": f_s}, {"b": f_t})
    assert base.item() > 0
    assert at({"b": 5.0 * f_s}, {"b": f_t}).item() == pytest.approx(base.item(), rel=1e-5)


def test_feature_kd_with_non_unet_teacher_warns_and_skips(student):
    s_ch = probe_feature_channels(student, (1, 3, 8, 8))
    with pytest.warns(UserWarning, match="feature KD is skipped"):
        kd = KDLoss(KDConfig(lambda_feat=0.1, feature_method="attention"), s_ch, None)
    assert not kd.uses_features and kd.lambda_feat == 0.0
    eps_s, eps_t = torch.ones(1, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    loss, terms = kd(eps_s, eps_t, None)
    assert (
        terms["loss_feat"] == 0.0
        and terms["loss"] == pytest.approx(1.0)
        and loss.item() == pytest.approx(1.0)
    )


def test_feature_blocks_subset_and_unknown(teacher, student):
    s_ch, t_ch = probe_feature_channels(student, (1, 3, 8, 8)), probe_feature_channels(teacher, (1, 3, 8, 8))
    kd = KDLoss(KDConfig(feature_blocks=["mid_block"]), s_ch, t_ch)
    assert kd.blocks == ["mid_block"] and len(kd.feature.adapters) == 1
    with pytest.raises(ConfigError, match=r"kd\.feature_blocks: \['up_blocks\.9'\]"):
        KDLoss(KDConfig(feature_blocks=["up_blocks.9"]), s_ch, t_ch)


def test_registry_new_method_is_one_small_class():
    with pytest.raises(
        ConfigError, match=r"kd\.feature_method: unknown 'l1_test'; registered: .*attention, fitnet"
    ):
        KDLoss(KDConfig(feature_method="l1_test"), {"b": 2}, {"b": 2})

    @register_kd("l1_test")
    class L1(FeatureKD):
        def block_loss(self, block, f_s, f_t):
            return (f_s - f_t).abs().mean()

    try:
        assert KD_METHODS["l1_test"] is L1
        kd = KDLoss(KDConfig(lambda_out=0.0, lambda_feat=2.0, feature_method="l1_test"), {"b": 2}, {"b": 2})
        f_s, f_t = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
        _, terms = kd(torch.zeros(1), None, None, {"b": f_s}, {"b": f_t})
        assert terms["loss_feat"] == 1.0 and terms["loss"] == 2.0
        with pytest.raises(ValueError, match="already registered"):
            register_kd("l1_test")(AttentionTransferKD)
    finally:
        KD_METHODS.pop("l1_test", None)
