"""MultiStudentUNet routing + persistence, and O2MKDPipeline equivalence with diffusers' own pipelines."""

import copy
import json
import subprocess
import sys
import textwrap

import conftest
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)

from o2mkd_ray import MultiStudentUNet, O2MKDPipeline, Segments

BOUNDS = (0, 300, 700, 1000)


def tiny_unet(seed: int, **kw) -> UNet2DModel:
    return conftest.tiny_unet(in_channels=3, seed=seed, **kw)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(0)


@pytest.fixture(scope="module")
def three():
    return MultiStudentUNet([tiny_unet(0), tiny_unet(1), tiny_unet(2)], boundaries=BOUNDS).eval()


def make_pipe(students, scheduler):
    pipe = O2MKDPipeline(students=students, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------
# MultiStudentUNet


@torch.no_grad()
def test_scalar_timestep_runs_only_the_owner(three):
    x = torch.randn(2, 3, 8, 8, generator=gen())
    assert three.num_students == 3 and three.segments == Segments(BOUNDS)
    for t, k in [(0, 0), (299, 0), (300, 1), (699, 1), (700, 2), (999, 2)]:
        assert torch.equal(three(x, t).sample, three.student(k)(x, t).sample)
    want = three.student(1)(x, 500).sample
    for t_in in (500.0, torch.tensor(500), torch.tensor([500])):  # the forms pipelines pass
        assert torch.equal(three(x, t_in).sample, want)
    assert not torch.allclose(want, three.student(0)(x, 500).sample)  # the students really differ
    assert torch.equal(three(x, 500, return_dict=False)[0], three.student(1)(x, 500).sample)


@torch.no_grad()
def test_mixed_batch_routes_each_element(three):
    t = torch.tensor([10, 500, 900, 299, 700])
    x = torch.randn(5, 3, 8, 8, generator=gen(1))
    out = three(x, t).sample
    assert out.shape == (5, 3, 8, 8)
    for i in range(5):
        k = three.segments.owner(int(t[i]))
        want = three.student(k)(x[i : i + 1], t[i : i + 1]).sample
        torch.testing.assert_close(out[i : i + 1], want, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="timestep"):
        three(x, torch.tensor([1, 2]))


@torch.no_grad()
def test_mixed_batch_slices_per_sample_kwargs():
    # class labels ride along with their samples: a label mix-up would change the output
    m = MultiStudentUNet(
        [tiny_unet(3, num_class_embeds=4), tiny_unet(4, num_class_embeds=4)], boundaries=(0, 500, 1000)
    )
    x, t, y = (
        torch.randn(4, 3, 8, 8, generator=gen(2)),
        torch.tensor([900, 10, 600, 20]),
        torch.tensor([0, 1, 2, 3]),
    )
    out = m(x, t, class_labels=y).sample
    for i in range(4):
        want = m.student(m.segments.owner(int(t[i])))(
            x[i : i + 1], t[i : i + 1], class_labels=y[i : i + 1]
        ).sample
        torch.testing.assert_close(out[i : i + 1], want, rtol=0, atol=1e-6)


@torch.no_grad()
def test_save_load_round_trip(three, tmp_path):
    three.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["boundaries"] == list(BOUNDS) and cfg["student_classes"] == ["UNet2DModel"] * 3
    loaded = MultiStudentUNet.from_pretrained(tmp_path)
    assert (
        loaded.segments == three.segments
        and loaded.config.sample_size == 8
        and loaded.config.in_channels == 3
    )
    assert list(loaded.config.value_range) == [-1.0, 1.0]
    x = torch.randn(3, 3, 8, 8, generator=gen(3))
    for t in (5, 400, 950, torch.tensor([5, 400, 950])):
        assert torch.equal(loaded(x, t).sample, three(x, t).sample)


@torch.no_grad()
def test_condition_unet_students_round_trip(tmp_path):
    def cond_unet(seed):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=8,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(4, 8),
            norm_num_groups=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8,
            attention_head_dim=2,
        ).eval()

    m = MultiStudentUNet([cond_unet(0), cond_unet(1)], boundaries=(0, 500, 1000))
    x, t = torch.randn(3, 3, 8, 8, generator=gen(4)), torch.tensor([100, 800, 499])
    ctx = torch.randn(3, 4, 8, generator=gen(5))  # (B, tokens, cross_attention_dim), sliced with the batch
    out = m(x, t, encoder_hidden_states=ctx).sample
    for i in range(3):
        want = m.student(m.segments.owner(int(t[i])))(x[i : i + 1], t[i : i + 1], ctx[i : i + 1]).sample
        torch.testing.assert_close(out[i : i + 1], want, rtol=0, atol=1e-6)
    m.save_pretrained(tmp_path)
    loaded = MultiStudentUNet.from_pretrained(tmp_path)
    assert isinstance(loaded.student(0), UNet2DConditionModel)
    assert torch.equal(loaded(x, t, encoder_hidden_states=ctx).sample, out)


def test_constructor_checks(unet):
    with pytest.raises(ValueError, match="2 students for 3 segments"):
        MultiStudentUNet([unet, unet], boundaries=BOUNDS)
    with pytest.raises(ValueError, match="in_channels"):
        MultiStudentUNet(
            [unet, UNet2DModel.from_config({**unet.config, "in_channels": 1})], boundaries=(0, 5, 10)
        )
    m = MultiStudentUNet(
        [unet] * 3, boundaries=BOUNDS
    )  # the same module thrice is copied, so it can be saved
    assert m.student(0) is unet and m.student(1) is not unet
    assert torch.equal(m.student(1).conv_in.weight, unet.conv_in.weight)


# ------------------------------------------------------------------------------------------------------------
# O2MKDPipeline: bit-exact against diffusers' pipelines


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_equals_ddim_pipeline(unet, eta):
    ref = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    ref.set_progress_bar_config(disable=True)
    want = ref(batch_size=2, generator=gen(7), eta=eta, num_inference_steps=4, output_type="np").images
    ours = make_pipe(MultiStudentUNet([unet], boundaries=(0, 1000)), DDIMScheduler())
    got = ours(batch_size=2, generator=gen(7), eta=eta, num_inference_steps=4, output_type="np").images
    assert got.shape == (2, 8, 8, 3) and np.array_equal(got, want)


def test_equals_ddpm_pipeline(unet):
    ref = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    ref.set_progress_bar_config(disable=True)
    want = ref(batch_size=2, generator=gen(8), num_inference_steps=5, output_type="np").images
    ours = make_pipe(MultiStudentUNet([unet], boundaries=(0, 1000)), DDPMScheduler())
    got = ours(batch_size=2, generator=gen(8), num_inference_steps=5, output_type="np").images
    assert np.array_equal(got, want)


def test_three_copies_equal_one_student(unet):
    one = make_pipe(MultiStudentUNet([unet], boundaries=(0, 1000)), DDIMScheduler())
    many = make_pipe(
        MultiStudentUNet([copy.deepcopy(unet) for _ in range(3)], boundaries=BOUNDS), DDIMScheduler()
    )
    want = one(batch_size=2, generator=gen(9), num_inference_steps=6, output_type="pt").images
    got = many(batch_size=2, generator=gen(9), num_inference_steps=6, output_type="pt").images
    # 6 DDIM steps visit all three segments
    assert {many.students.segments.owner(int(t)) for t in many.scheduler.timesteps} == {0, 1, 2}
    assert got.shape == (2, 3, 8, 8) and torch.equal(got, want)


def test_latents_and_output_types(unet):
    pipe = make_pipe(MultiStudentUNet([unet], boundaries=(0, 1000)), DDIMScheduler())
    kw = {"batch_size": 2, "num_inference_steps": 3}
    want = pipe(generator=gen(10), output_type="pt", **kw).images
    latents = torch.randn(2, 3, 8, 8, generator=gen(10))
    assert torch.equal(pipe(latents=latents, output_type="pt", **kw).images, want)
    pil = pipe(generator=gen(10), output_type="pil", **kw).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    (np_images,) = pipe(generator=gen(10), output_type="np", return_dict=False, **kw)
    assert np.array_equal(np_images, want.permute(0, 2, 3, 1).numpy())
    with pytest.raises(ValueError, match="list of generators of length 1"):
        pipe(generator=[gen(0)], **kw)
    with pytest.raises(ValueError, match="output_type"):
        pipe(generator=gen(0), output_type="jpg", **kw)


def test_value_range_maps_to_unit_interval(unet):
    wide = MultiStudentUNet([unet], boundaries=(0, 1000), value_range=(-1000.0, 1000.0))
    images = make_pipe(wide, DDIMScheduler())(
        batch_size=1, generator=gen(11), num_inference_steps=2, output_type="pt"
    )
    assert ((images.images - 0.5).abs() < 0.01).all()  # x in roughly [-5, 5] maps to 0.5 +- 0.0025


@pytest.mark.parametrize(
    "scheduler_cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler]
)
def test_other_schedulers_run(three, scheduler_cls):
    # Euler: float timesteps, init_noise_sigma > 1 and a real scale_model_input; PNDM: step takes no generator
    pipe = make_pipe(three, scheduler_cls())
    images = pipe(batch_size=2, generator=gen(12), num_inference_steps=5, output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1
    assert type(pipe.scheduler) is scheduler_cls  # kept as given, not converted


def test_steps_per_segment(three):
    calls = [0, 0, 0]
    hooks = [
        three.student(k).register_forward_hook(lambda *_, k=k: calls.__setitem__(k, calls[k] + 1))
        for k in range(3)
    ]
    try:
        pipe = make_pipe(three, DDPMScheduler())
        pipe(batch_size=1, generator=gen(13), steps_per_segment=[2, 3, 1], output_type="np")
    finally:
        for h in hooks:
            h.remove()
    ts = pipe.scheduler.timesteps.tolist()
    assert len(ts) == 6 and ts == sorted(ts, reverse=True) and ts[0] == 999
    assert [sum(three.segments.owner(t) == k for t in ts) for k in range(3)] == [2, 3, 1]
    assert calls == [2, 3, 1]  # each step ran exactly once, on the owner
    with pytest.raises(ValueError, match="2 values for 3 segments"):
        pipe(generator=gen(0), steps_per_segment=[1, 1])
    with pytest.raises(ValueError, match=r"steps_per_segment\[0\]"):
        pipe(generator=gen(0), steps_per_segment=[301, 1, 1])
    with pytest.raises(ValueError, match="DDIMScheduler does not"):
        make_pipe(three, DDIMScheduler())(generator=gen(0), steps_per_segment=[1, 1, 1])


# ------------------------------------------------------------------------------------------------------------
# persistence


def test_pipeline_save_load_round_trip(three, tmp_path):
    pipe = make_pipe(three, DDIMScheduler())
    want = pipe(batch_size=2, generator=gen(14), num_inference_steps=4, output_type="np").images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["students"] == ["o2mkd_ray.pipelines.multi_unet", "MultiStudentUNet"]
    assert (tmp_path / "students" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = O2MKDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    got = loaded(batch_size=2, generator=gen(14), num_inference_steps=4, output_type="np").images
    assert np.array_equal(got, want)

    # a fresh interpreter finds every class from model_index.json alone
    out = tmp_path / "fresh.npy"
    code = textwrap.dedent(f"""
        import numpy as np, torch
        torch.set_num_threads({torch.get_num_threads()})  # same kernels as this process: bit-exact comparison
        from o2mkd_ray import O2MKDPipeline
        pipe = O2MKDPipeline.from_pretrained({str(tmp_path)!r})
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(14)
        np.save({str(out)!r}, pipe(batch_size=2, generator=g, num_inference_steps=4, output_type="np").images)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    assert np.array_equal(np.load(out), want)
