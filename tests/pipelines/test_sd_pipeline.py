"""O2MKDStableDiffusionPipeline: bit-exact against StableDiffusionPipeline, routing, persistence."""

import copy
import json

import conftest
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from o2mkd_ray.core.fixtures import make_tiny_sd
from o2mkd_ray.core.sd import encode_prompts
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet
from o2mkd_ray.pipelines.stable_diffusion import O2MKDStableDiffusionPipeline

PROMPTS = ["a red cube", "two blue balls"]
NEGATIVE = ["blurry", "dark"]  # diffusers wants the negative prompt the same type (list) as the prompt
THREE = [0, 333, 667, 1000]


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "sd"
    make_tiny_sd(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(sd_dir):
    # loaded back from disk rather than make_tiny_sd's return value: that one's VAE is in training mode, whose
    # attention differs in the last bits from the eval-mode VAE every from_pretrained gives
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(teacher, scheduler_cls):
    """diffusers' own pipeline on the teacher's modules with a fresh scheduler of ``scheduler_cls``.

    Built through the constructor like the O2MKD pipelines: StableDiffusionPipeline.__init__ rewrites the
    scheduler's config (``clip_sample=False``, ``steps_offset=1``), a scheduler assigned later keeps its own
    (DDIMScheduler.from_config of SD's PNDM config has clip_sample=True)."""
    pipe = StableDiffusionPipeline(**{**teacher.components,
                                      "scheduler": scheduler_cls.from_config(teacher.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def o2mkd(teacher_or_dir, students, scheduler=None):
    pipe = O2MKDStableDiffusionPipeline.from_teacher(teacher_or_dir, students, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def perturbed(unet, seed=1, scale=0.05):
    other = copy.deepcopy(unet)
    g = gen(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return other


def sample(pipe, seed=0, **kw):
    kw.setdefault("num_inference_steps", 4)
    return pipe(generator=gen(seed), output_type="np", **kw).images


def count_calls(multi):
    """Per-student forward calls as (timestep, batch) lists; returns (calls, remove)."""
    calls = [[] for _ in range(multi.num_students)]

    def hook(k):
        return lambda mod, args, kwargs, out: calls[k].append((float(args[1]), args[0].shape[0]))

    handles = [multi.student(k).register_forward_hook(hook(k), with_kwargs=True)
               for k in range(multi.num_students)]
    return calls, lambda: [h.remove() for h in handles]


# ------------------------------------------------------------------------------------------------------------
# bit-exact against StableDiffusionPipeline


@pytest.mark.parametrize("scheduler_cls", [PNDMScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_equals_stable_diffusion_pipeline(teacher, sd_dir, scheduler_cls):
    ref = reference(teacher, scheduler_cls)
    embeds = encode_prompts(teacher.tokenizer, teacher.text_encoder, ["a green tree", "sky"])  # (2, 77, 16)
    neg = encode_prompts(teacher.tokenizer, teacher.text_encoder, NEGATIVE)
    by_embeds = {"prompt_embeds": embeds, "negative_prompt_embeds": neg, "guidance_scale": 7.5}
    by_text = {"prompt": PROMPTS, "negative_prompt": NEGATIVE, "guidance_scale": 7.5}
    want_e, want_t = sample(ref, **by_embeds), sample(ref, **by_text)
    assert want_e.shape == (2, 16, 16, 3) and not np.array_equal(want_e, want_t)

    one = o2mkd(teacher, MultiStudentUNet([teacher.unet], boundaries=[0, 1000]),
                scheduler_cls.from_config(teacher.scheduler.config))
    three = o2mkd(str(sd_dir), MultiStudentUNet([teacher.unet] * 3, boundaries=THREE),  # copies
                  scheduler_cls.from_config(teacher.scheduler.config))
    assert type(one.scheduler) is scheduler_cls and one.vae is teacher.vae and one.safety_checker is None
    for pipe in (one, three):
        assert np.array_equal(sample(pipe, **by_embeds), want_e)
        assert np.array_equal(sample(pipe, **by_text), want_t)
    owners = {three.unet.segments.owner(int(t)) for t in three.scheduler.timesteps}
    assert owners == {0, 1, 2}  # 4 steps visit every segment


def test_time_cond_proj_dim_student(teacher):
    # guidance-embedding UNets (LCM-style): the pipeline reads time_cond_proj_dim from the MultiStudentUNet,
    # passes timestep_cond and skips classifier-free guidance, exactly like StableDiffusionPipeline
    unet = UNet2DConditionModel.from_config({**teacher.unet.config, "time_cond_proj_dim": 8}).eval()
    ref = reference(teacher, DDIMScheduler)
    ref.unet = unet
    multi = MultiStudentUNet([unet], boundaries=[0, 1000])
    assert multi.config.time_cond_proj_dim == 8
    pipe = o2mkd(teacher, multi, DDIMScheduler.from_config(teacher.scheduler.config))
    calls, remove = count_calls(multi)
    try:
        got = sample(pipe, prompt=PROMPTS, guidance_scale=7.5, num_inference_steps=2)
    finally:
        remove()
    assert [b for _, b in calls[0]] == [2, 2]  # no CFG doubling
    assert np.array_equal(got, sample(ref, prompt=PROMPTS, guidance_scale=7.5, num_inference_steps=2))


# ------------------------------------------------------------------------------------------------------------
# routing


def test_each_step_runs_on_its_owner(teacher):
    multi = MultiStudentUNet([teacher.unet, perturbed(teacher.unet)], boundaries=[0, 500, 1000])
    pipe = o2mkd(teacher, multi, DDIMScheduler.from_config(teacher.scheduler.config))
    calls, remove = count_calls(multi)
    try:
        got = sample(pipe, prompt=PROMPTS, guidance_scale=7.5, num_inference_steps=6)
    finally:
        remove()
    ts = [float(t) for t in pipe.scheduler.timesteps]
    assert [len(c) for c in calls] == [sum(t < 500 for t in ts), sum(t >= 500 for t in ts)] == [4, 2]
    assert sorted(t for c in calls for t, _ in c) == sorted(ts)  # every step once, on the owner
    assert all(t < 500 for t, _ in calls[0]) and all(t >= 500 for t, _ in calls[1])
    assert all(b == 4 for c in calls for _, b in c)  # CFG: both branches in one call of batch 2B
    want = sample(reference(teacher, DDIMScheduler), prompt=PROMPTS, guidance_scale=7.5,
                  num_inference_steps=6)
    assert not np.array_equal(got, want)  # the perturbed student really ran


def test_guidance_scale_matters(teacher):
    pipe = o2mkd(teacher, MultiStudentUNet([teacher.unet], boundaries=[0, 1000]))
    calls, remove = count_calls(pipe.unet)
    try:
        plain = sample(pipe, prompt=PROMPTS, guidance_scale=1.0, num_inference_steps=2)
    finally:
        remove()
    assert all(b == 2 for _, b in calls[0])  # guidance 1: conditional branch only
    guided = sample(pipe, prompt=PROMPTS, guidance_scale=7.5, num_inference_steps=2)
    assert np.isfinite(plain).all() and not np.allclose(plain, guided)


@pytest.mark.parametrize("scheduler_cls",
                         [DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDPMScheduler])
def test_steps_per_segment(teacher, scheduler_cls):
    multi = MultiStudentUNet([teacher.unet, perturbed(teacher.unet), perturbed(teacher.unet, 2)],
                             boundaries=THREE)
    pipe = o2mkd(teacher, multi, scheduler_cls.from_config(teacher.scheduler.config))
    unet_calls = []
    h = multi.register_forward_hook(lambda mod, args, kw, out: unet_calls.append(args[0].shape[0]),
                                    with_kwargs=True)
    calls, remove = count_calls(multi)
    try:
        images = sample(pipe, prompt=PROMPTS, negative_prompt=NEGATIVE, steps_per_segment=[2, 3, 1])
    finally:
        h.remove()
        remove()
    assert np.isfinite(images).all()
    ts = [int(t) for t in pipe.scheduler.timesteps]
    assert ts[0] == 999 and ts == sorted(ts, reverse=True)
    assert unet_calls == [4] * 6  # sum(steps) UNet calls, each on the CFG batch 2B
    assert [len(c) for c in calls] == [2, 3, 1]


def test_steps_per_segment_errors(teacher):
    multi = MultiStudentUNet([teacher.unet] * 3, boundaries=THREE)
    for cls in (PNDMScheduler, DDIMScheduler):
        pipe = o2mkd(teacher, multi, cls.from_config(teacher.scheduler.config))
        with pytest.raises(ValueError, match=f"custom `timesteps`.*{cls.__name__} does not"):
            pipe(prompt="x", steps_per_segment=[1, 1, 1], generator=gen())
    pipe = o2mkd(teacher, multi, DPMSolverMultistepScheduler.from_config(teacher.scheduler.config))
    with pytest.raises(ValueError, match="2 values for 3 segments"):
        pipe(prompt="x", steps_per_segment=[1, 1])
    with pytest.raises(ValueError, match=r"steps_per_segment\[0\]"):
        pipe(prompt="x", steps_per_segment=[334, 1, 1])
    with pytest.raises(ValueError, match="not both"):
        pipe(prompt="x", steps_per_segment=[1, 1, 1], timesteps=[999, 500])


# ------------------------------------------------------------------------------------------------------------
# construction and persistence


def test_save_load_round_trip(teacher, tmp_path):
    multi = MultiStudentUNet([teacher.unet, perturbed(teacher.unet)], boundaries=[0, 400, 1000])
    pipe = o2mkd(teacher, multi, DPMSolverMultistepScheduler.from_config(teacher.scheduler.config))
    kw = {"prompt": PROMPTS, "negative_prompt": NEGATIVE, "guidance_scale": 7.5}
    want = sample(pipe, **kw)
    pipe.save_pretrained(tmp_path)
    for sub in ("vae", "text_encoder", "tokenizer", "unet", "scheduler"):
        assert (tmp_path / sub).is_dir(), sub
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["o2mkd_ray.pipelines.multi_unet", "MultiStudentUNet"]
    assert index["_class_name"] == "O2MKDStableDiffusionPipeline" and index["safety_checker"] == [None, None]
    loaded = O2MKDStableDiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, MultiStudentUNet) and list(loaded.unet.config.boundaries) == [0, 400, 1000]
    assert type(loaded.scheduler) is DPMSolverMultistepScheduler
    assert np.array_equal(sample(loaded, **kw), want)


def test_old_multi_unet_config_loads(teacher, tmp_path):
    multi = MultiStudentUNet([teacher.unet], boundaries=[0, 1000])
    multi.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["time_cond_proj_dim"] is None and cfg["cross_attention_dim"] == 16
    for key in ("time_cond_proj_dim", "cross_attention_dim"):  # a config saved before these keys existed
        del cfg[key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = MultiStudentUNet.from_pretrained(tmp_path)
    assert loaded.config.time_cond_proj_dim is None and loaded.config.cross_attention_dim == 16


def test_constructor_checks(teacher, tmp_path):
    with pytest.raises(TypeError, match="must be a MultiStudentUNet"):
        O2MKDStableDiffusionPipeline(teacher.vae, teacher.text_encoder, teacher.tokenizer, teacher.unet,
                                     teacher.scheduler)
    with pytest.raises(ValueError, match="UNet2DConditionModel students"):
        o2mkd(teacher, MultiStudentUNet([conftest.tiny_unet(4)], boundaries=[0, 1000]))
    with pytest.raises(ConfigError, match="not a Stable Diffusion folder"):
        o2mkd(tmp_path / "nowhere", MultiStudentUNet([teacher.unet], boundaries=[0, 1000]))
    pipe = o2mkd(teacher, MultiStudentUNet([teacher.unet], boundaries=[0, 500]))
    with pytest.raises(ValueError, match="end at 500 .* num_train_timesteps=1000"):
        pipe(prompt="x", num_inference_steps=1)


def test_attention_slicing_and_freeu_reach_the_students(teacher):
    ref = reference(teacher, DDIMScheduler)
    pipe = o2mkd(teacher, MultiStudentUNet([teacher.unet] * 2, boundaries=[0, 500, 1000]),
                 DDIMScheduler.from_config(teacher.scheduler.config))
    kw = {"prompt": PROMPTS, "num_inference_steps": 2}
    plain = sample(pipe, **kw)
    pipe.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert all(pipe.unet.student(k).up_blocks[0].b1 == 1.2 for k in range(2))
    assert not np.array_equal(sample(pipe, **kw), plain)
    pipe.disable_freeu()
    assert np.array_equal(sample(pipe, **kw), plain)
    try:
        ref.enable_attention_slicing(1)
        pipe.enable_attention_slicing(1)
        procs = [type(p).__name__ for k in range(2) for p in pipe.unet.student(k).attn_processors.values()]
        assert procs and set(procs) == {"SlicedAttnProcessor"}
        assert np.array_equal(sample(pipe, **kw), sample(ref, **kw))
    finally:
        ref.disable_attention_slicing()  # the teacher's UNet is shared by the module's tests
        pipe.disable_attention_slicing()
