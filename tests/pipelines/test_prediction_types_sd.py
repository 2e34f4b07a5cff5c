"""A v-prediction, SD 2.x-like tiny text-to-image teacher: pre-flight, sampling bit-exact with diffusers' own
StableDiffusionPipeline, and data synthesis reading the teacher's output as velocity."""

import json

import conftest
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from o2mkd_ray.config.loading import load_config
from o2mkd_ray.core.fixtures import make_tiny_sd
from o2mkd_ray.core.schedulers import make_scheduler
from o2mkd_ray.core.sd import encode_prompts
from o2mkd_ray.core.teacher import TeacherFn, load_teacher
from o2mkd_ray.core.teacher_checks import check_teacher
from o2mkd_ray.data.cond_cache import synthesize_latents
from o2mkd_ray.pipelines.build import build_sd_pipeline

PROMPTS = ["a red cube", "two blue balls"]


@pytest.fixture(scope="module")
def v_sd_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vsd") / "sd"
    make_tiny_sd(folder, prediction_type="v_prediction", sd2=True)
    return folder


@pytest.fixture(scope="module")
def teacher(v_sd_dir):
    # loaded back from disk: make_tiny_sd's own VAE is in training mode (see test_sd_pipeline.py)
    pipe = StableDiffusionPipeline.from_pretrained(v_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, **kw):
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(0), num_inference_steps=4, guidance_scale=7.5,
                output_type="np", **kw).images


def test_fixture_is_sd2_like(teacher):
    u = teacher.unet.config
    assert teacher.scheduler.config.prediction_type == "v_prediction" and isinstance(teacher.scheduler, DDIMScheduler)
    assert u.use_linear_projection and u.upcast_attention and list(u.attention_head_dim) == [2, 4]
    assert u.sample_size == 12


def test_preflight_and_loading_accept_the_v_teacher(v_sd_dir, prompts_file):
    cfg = load_config(conftest.ROOT / "pipelines" / "tiny.yaml", conftest.sd_overrides(v_sd_dir, prompts_file))
    check_teacher(cfg.teacher, cfg.data, segments=cfg.segments, students=cfg.students)
    _, sched = load_teacher(cfg.teacher)
    assert sched.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("name", ["ddim", "dpm"])
def test_v_prediction_sd_pipeline_equals_diffusers(teacher, name):
    ref = StableDiffusionPipeline(**{**teacher.components,
                                     "scheduler": make_scheduler(name, teacher.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    want = sample(ref)
    ours = build_sd_pipeline([teacher.unet], [0, 1000], teacher, name)  # as a run builds it
    ours.set_progress_bar_config(disable=True)
    assert ours.scheduler.config.prediction_type == "v_prediction"
    got = sample(ours)
    assert got.shape == (2, 24, 24, 3) and np.array_equal(got, want)
    # the parameterisation matters: the same UNet read as ε samples other images
    ours.scheduler = make_scheduler(name, {**teacher.scheduler.config, "prediction_type": "epsilon"})
    assert not np.allclose(sample(ours), want, atol=1e-3)


def test_synthesized_latents_read_the_teacher_as_velocity(teacher):
    """Data-free x_0 of a v teacher are exactly the latents diffusers' pipeline samples (DDIM, same guidance)."""
    embeds = encode_prompts(teacher.tokenizer, teacher.text_encoder, PROMPTS)
    uncond = encode_prompts(teacher.tokenizer, teacher.text_encoder, [""])
    got = synthesize_latents(TeacherFn(teacher.unet), teacher.scheduler.config, embeds, uncond, (4, 12, 12),
                             steps=3, guidance=5.0, seed=0)
    ref = StableDiffusionPipeline(**{**teacher.components,
                                     "scheduler": DDIMScheduler.from_config(teacher.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    want = ref(prompt_embeds=embeds, negative_prompt_embeds=uncond.expand_as(embeds), guidance_scale=5.0,
               num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal(got, want)


def test_local_engine_distils_the_v_teacher(v_sd_dir, prompts_file, tmp_path):
    """A seconds-long text-to-image run (data synthesised by the v teacher, task loss on): its pipeline samples with
    the teacher's v-prediction scheduler config."""
    from o2mkd_ray.engine.session import run_local
    from o2mkd_ray.pipelines.stable_diffusion import O2MKDStableDiffusionPipeline

    cfg = load_config(conftest.ROOT / "pipelines" / "tiny.yaml",
                      [*conftest.sd_overrides(v_sd_dir, prompts_file), "train.steps=4", "train.checkpoint_every=2",
                       "kd.lambda_task=0.1"])
    report = run_local(cfg, tmp_path / "run", progress=False)
    assert [s["steps"] for s in report["segments"]] == [4, 4]
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all(np.isfinite(h["loss"]) and h["loss_task"] > 0 for seg in history.values() for h in seg)
    pipe = O2MKDStableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    img = pipe("a red square", num_inference_steps=3, guidance_scale=5.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 24, 24, 3) and np.isfinite(img).all()
