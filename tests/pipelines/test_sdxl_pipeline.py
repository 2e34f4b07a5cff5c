"""O2MKDStableDiffusionXLPipeline: bit-exact against StableDiffusionXLPipeline, added-conditioning routing,
persistence, and the SDXL teacher kind."""

import copy
import json

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from o2mkd_ray import O2MKDStableDiffusionXLPipeline
from o2mkd_ray.cli.main import main
from o2mkd_ray.config.schema import TeacherConfig
from o2mkd_ray.core.teacher import teacher_kind
from o2mkd_ray.core.teacher_checks import check_teacher
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet

PROMPTS = ["a red cube", "two blue balls"]
NEGATIVE = ["blurry", "dark"]
UNEVEN = [0, 250, 700, 1000]  # 4 Euler/DPM steps (751, 501, 251, 1) visit all three segments, two on the middle one
TEXT_KW = {"prompt": PROMPTS, "negative_prompt": NEGATIVE, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def teacher(tiny_sdxl_dir):
    # loaded back from disk: make_tiny_sdxl's own VAE is in training mode (attention differs in the last bits)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(teacher, scheduler_cls):
    """diffusers' own pipeline on the teacher's modules with a fresh ``scheduler_cls`` on the teacher's config."""
    pipe = StableDiffusionXLPipeline(**{**teacher.components,
                                        "scheduler": scheduler_cls.from_config(teacher.scheduler.config)},
                                     add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def o2mkd(teacher_or_dir, students, scheduler=None):
    pipe = O2MKDStableDiffusionXLPipeline.from_teacher(teacher_or_dir, students, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, seed=0, **kw):
    kw.setdefault("num_inference_steps", 4)
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="pt", **kw).images  # (B, 3, H, W)


def perturbed(unet, seed=1, scale=0.05):
    other = copy.deepcopy(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def count_calls(multi):
    """Per-student forward calls as (timestep, batch) lists; returns (calls, remove)."""
    calls = [[] for _ in range(multi.num_students)]

    def hook(k):
        return lambda mod, args, kwargs, out: calls[k].append((float(args[1]), args[0].shape[0]))

    handles = [multi.student(k).register_forward_hook(hook(k), with_kwargs=True) for k in range(multi.num_students)]
    return calls, lambda: [h.remove() for h in handles]


@pytest.mark.parametrize("scheduler_cls", [EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_equals_sdxl_pipeline(teacher, tiny_sdxl_dir, scheduler_cls):
    want = sample(reference(teacher, scheduler_cls), **TEXT_KW)
    assert want.shape == (2, 3, 16, 16)
    one = o2mkd(teacher, MultiStudentUNet([teacher.unet], boundaries=[0, 1000]),
                scheduler_cls.from_config(teacher.scheduler.config))
    three = o2mkd(str(tiny_sdxl_dir), MultiStudentUNet([teacher.unet] * 3, boundaries=UNEVEN),  # copies
                  scheduler_cls.from_config(teacher.scheduler.config))
    assert one.vae is teacher.vae and one.text_encoder_2 is teacher.text_encoder_2 and one.watermark is None
    assert type(three.scheduler) is scheduler_cls
    calls, remove = count_calls(three.unet)
    try:
        got_three = sample(three, **TEXT_KW)
    finally:
        remove()
    assert torch.equal(sample(one, **TEXT_KW), want)
    assert torch.equal(got_three, want)
    assert [len(c) for c in calls] == [1, 2, 1]  # every segment ran, each step on its owner
    assert all(b == 4 for c in calls for _, b in c)  # classifier-free guidance: batch 2B in one call


def test_added_cond_kwargs_routed_per_element(teacher):
    """A mixed-timestep batch laid out as a guidance batch (B negatives then B positives) gives each row the
    output of its owner run on that row's text, pooled text and time ids alone."""
    students = [teacher.unet, perturbed(teacher.unet)]
    multi = MultiStudentUNet(students, boundaries=[0, 500, 1000])
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 900, 900, 10])  # rows 0, 3 -> student 0; rows 1, 2 -> student 1
    text = torch.randn(4, 7, 32, generator=g)  # (2B, L, D1 + D2)
    added = {"text_embeds": torch.randn(4, 16, generator=g),  # (2B, pooled dim)
             "time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16], [32, 32, 0, 0, 16, 16],
                                       [16, 16, 4, 4, 16, 16], [64, 64, 0, 0, 32, 32]])}  # (2B, 6)
    with torch.no_grad():
        got = multi(x, t, encoder_hidden_states=text, added_cond_kwargs=added).sample
        for k, rows in ((0, [0, 3]), (1, [1, 2])):
            idx = torch.tensor(rows)
            want = students[k](x[idx], t[idx], encoder_hidden_states=text[idx],
                               added_cond_kwargs={n: v[idx] for n, v in added.items()}).sample
            assert torch.equal(got[idx], want), k
        # the time ids really condition the output: another row's ids give another result
        swapped = {**added, "time_ids": added["time_ids"].flip(0)}
        assert not torch.equal(multi(x, t, encoder_hidden_states=text, added_cond_kwargs=swapped).sample, got)


def test_steps_per_segment(teacher):
    multi = MultiStudentUNet([teacher.unet, perturbed(teacher.unet), perturbed(teacher.unet, 2)], boundaries=UNEVEN)
    pipe = o2mkd(teacher, multi)  # the teacher's Euler
    calls, remove = count_calls(multi)
    try:
        images = sample(pipe, steps_per_segment=[1, 1, 2], **TEXT_KW)
    finally:
        remove()
    assert torch.isfinite(images).all()
    assert [int(t) for t in pipe.scheduler.timesteps] == [999, 849, 699, 249]
    assert [len(c) for c in calls] == [1, 1, 2]
    with pytest.raises(ValueError, match="not both"):
        pipe(prompt="x", steps_per_segment=[1, 1, 1], timesteps=[999, 500])


def test_save_load_round_trip(teacher, tmp_path):
    multi = MultiStudentUNet([teacher.unet, perturbed(teacher.unet)], boundaries=[0, 400, 1000])
    pipe = o2mkd(teacher, multi, DPMSolverMultistepScheduler.from_config(teacher.scheduler.config))
    want = sample(pipe, num_inference_steps=3, **TEXT_KW)
    assert not torch.equal(want, sample(reference(teacher, DPMSolverMultistepScheduler), num_inference_steps=3,
                                        **TEXT_KW))  # the perturbed student ran
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "O2MKDStableDiffusionXLPipeline"
    assert index["unet"] == ["o2mkd_ray.pipelines.multi_unet", "MultiStudentUNet"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    loaded = O2MKDStableDiffusionXLPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, MultiStudentUNet) and list(loaded.unet.config.boundaries) == [0, 400, 1000]
    assert loaded.unet.config.addition_time_embed_dim == 8 and type(loaded.scheduler) is DPMSolverMultistepScheduler
    assert torch.equal(sample(loaded, num_inference_steps=3, **TEXT_KW), want)
    # the saved folder samples from the command line too (in this process: the real entry point's main)
    png = tmp_path.parent / f"{tmp_path.name}-grid.png"
    rc = main(["sample", str(tmp_path), "--prompt", "a red cube", "--num-images", "2", "--steps", "2",
               "--scheduler", "euler", "--output", str(png)])
    assert rc == 0 and Image.open(png).size[0] >= 2 * 16


def test_constructor_checks(teacher, tmp_path):
    with pytest.raises(TypeError, match="must be a MultiStudentUNet"):
        O2MKDStableDiffusionXLPipeline(**{**teacher.components, "unet": teacher.unet})
    sd_like = UNet2DConditionModel.from_config({**teacher.unet.config, "addition_embed_type": None})
    with pytest.raises(ValueError, match="no SDXL added conditioning"):
        o2mkd(teacher, MultiStudentUNet([sd_like], boundaries=[0, 1000]))
    with pytest.raises(ConfigError, match="not a Stable Diffusion XL folder") as e:
        o2mkd(tmp_path / "nowhere", MultiStudentUNet([teacher.unet], boundaries=[0, 1000]))
    assert "\n" not in str(e.value)
    pipe = o2mkd(teacher, MultiStudentUNet([teacher.unet], boundaries=[0, 500]))
    with pytest.raises(ValueError, match="end at 500 .* num_train_timesteps=1000"):
        pipe(prompt="x", num_inference_steps=1)


def test_sdxl_teacher_kind_is_recognised_and_checked_in_one_line(tiny_sdxl_dir, tmp_path):
    import shutil

    assert teacher_kind(TeacherConfig(pretrained=str(tiny_sdxl_dir))) == "stable_diffusion_xl"
    check_teacher(TeacherConfig(pretrained=str(tiny_sdxl_dir)))  # a complete SDXL folder passes
    broken = tmp_path / "xl_without_second_encoder"
    shutil.copytree(tiny_sdxl_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ConfigError, match="not a complete Stable Diffusion XL folder .missing text_encoder_2/") as e:
        check_teacher(TeacherConfig(pretrained=str(broken)))
    assert "\n" not in str(e.value)
    # an SD 1.x folder (same unet/ class, model_index naming StableDiffusionPipeline) keeps its kind
    sd = tmp_path / "sd"
    (sd / "unet").mkdir(parents=True)
    (sd / "unet" / "config.json").write_text((tiny_sdxl_dir / "unet" / "config.json").read_text())
    (sd / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    assert teacher_kind(TeacherConfig(pretrained=str(sd))) == "stable_diffusion"
