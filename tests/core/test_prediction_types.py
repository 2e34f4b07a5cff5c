"""Teachers of any parameterisation (ε, v, x_0): task targets, pre-flight, sampling equivalence with diffusers and a
short distillation of a tiny v-prediction teacher."""

import json
import shutil
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, PNDMScheduler

from o2mkd_ray import MultiStudentUNet, O2MKDPipeline
from o2mkd_ray.config.loading import load_config
from o2mkd_ray.core.schedulers import make_scheduler
from o2mkd_ray.core.segments import Segments
from o2mkd_ray.core.targets import task_target
from o2mkd_ray.core.teacher import load_teacher
from o2mkd_ray.core.teacher_checks import check_teacher
from o2mkd_ray.distill.distiller import SegmentDistiller
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.eval.metrics import teacher_agreement

TINY = str(conftest.ROOT / "pipelines" / "tiny.yaml")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def abar(scheduler, t):
    return scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)


def save_teacher(path: Path, prediction_type: str, seed: int = 0) -> Path:
    unet = conftest.tiny_unet(1, 8, seed=seed)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
                 ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def v_teacher_dir(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp("vteacher") / "teacher", "v_prediction")


# ------------------------------------------------------------------------------------------------------------
# task targets


@pytest.mark.parametrize("cls", [DDPMScheduler, PNDMScheduler])  # PNDM has no get_velocity: the ᾱ_t formula
def test_task_target_per_prediction_type(cls):
    x_0, eps = torch.randn(4, 1, 8, 8, generator=gen(1)), torch.randn(4, 1, 8, 8, generator=gen(2))
    t = torch.tensor([0, 10, 500, 999])
    base = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config
    e, v, s = (cls.from_config(base, prediction_type=p) for p in ("epsilon", "v_prediction", "sample"))
    a = abar(e, t)
    assert task_target(e, x_0, eps, t) is eps
    assert task_target(s, x_0, eps, t) is x_0
    want_v = a.sqrt() * eps - (1 - a).sqrt() * x_0  # Salimans & Ho 2022
    torch.testing.assert_close(task_target(v, x_0, eps, t), want_v, rtol=1e-6, atol=1e-6)
    # and it is the v of x_t: x_0 = √ᾱ·x_t − √(1−ᾱ)·v
    x_t = DDPMScheduler.from_config(base).add_noise(x_0, eps, t)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * want_v, x_0, rtol=1e-5, atol=1e-5)
    bad = DDPMScheduler.from_config(base)
    bad.register_to_config(prediction_type="flow")
    with pytest.raises(ConfigError, match="unknown prediction_type 'flow'"):
        task_target(bad, x_0, eps, t)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_make_inputs_gives_the_target_of_the_teacher_type(tiny_teacher_dir, pred):
    cfg = load_config(TINY, [f"teacher.pretrained={tiny_teacher_dir}", "kd.lambda_task=1", "kd.lambda_feat=0"])
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=pred)
    student = conftest.tiny_unet(1, 8)
    dist = SegmentDistiller(cfg, 1, Segments.uniform(1000, 3), sched, student, {})
    x_0 = torch.rand(6, 1, 8, 8, generator=gen(3)) * 2 - 1
    x_t, t, target = dist.make_inputs(x_0, gen(4))
    a = abar(sched, t)
    x0_of = {"epsilon": (x_t - (1 - a).sqrt() * target) / a.sqrt(),
             "v_prediction": a.sqrt() * x_t - (1 - a).sqrt() * target, "sample": target}[pred]
    torch.testing.assert_close(x0_of, x_0, rtol=1e-4, atol=1e-4)
    # the task loss is the student's distance to that target
    with torch.no_grad():
        out = student(x_t, t).sample
    _, terms = dist.kd(out, out, target)
    assert terms["loss_task"] == pytest.approx(torch.mean((out - target) ** 2).item(), rel=1e-5)


# ------------------------------------------------------------------------------------------------------------
# pre-flight


@pytest.mark.parametrize("pred", ["v_prediction", "sample", "flow"])
def test_preflight_accepts_v_and_sample_and_rejects_unknown_in_one_line(tiny_teacher_dir, tmp_path, pred):
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, folder)
    f = folder / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "prediction_type": pred}))
    cfg = load_config(TINY, [f"teacher.pretrained={folder}"])
    if pred == "flow":
        with pytest.raises(ConfigError) as e:
            check_teacher(cfg.teacher, cfg.data, segments=cfg.segments, students=cfg.students)
        msg = str(e.value)
        assert "\n" not in msg and "prediction_type 'flow'" in msg and "v_prediction" in msg
        with pytest.raises(ConfigError, match="prediction_type 'flow'"):
            load_teacher(cfg.teacher)
        return
    check_teacher(cfg.teacher, cfg.data, segments=cfg.segments, students=cfg.students)
    _, sched = load_teacher(cfg.teacher)
    assert sched.config.prediction_type == pred


# ------------------------------------------------------------------------------------------------------------
# sampling: bit-exact with diffusers for a v-prediction teacher


def o2mkd_pipe(unet, sched_name, teacher_sched):
    pipe = O2MKDPipeline(students=MultiStudentUNet([unet], boundaries=(0, 1000)),
                         scheduler=make_scheduler(sched_name, teacher_sched.config))  # as a run builds it
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sched_name", ["ddim", "dpm"])
def test_v_prediction_pipeline_equals_diffusers(v_teacher_dir, sched_name):
    unet, sched = load_teacher(load_config(TINY, [f"teacher.pretrained={v_teacher_dir}"]).teacher)
    ours = o2mkd_pipe(unet, sched_name, sched)
    assert ours.scheduler.config.prediction_type == "v_prediction"
    kw = {"batch_size": 2, "num_inference_steps": 4, "output_type": "np"}
    if sched_name == "ddim":  # DDIMPipeline turns any scheduler into a DDIM one on the same config
        ref = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(sched.config))
    else:  # DDPMPipeline keeps the scheduler it is given
        ref = DDPMPipeline(unet=unet, scheduler=make_scheduler("dpm", sched.config))
    ref.set_progress_bar_config(disable=True)
    want = ref(generator=gen(7), **kw).images
    got = ours(generator=gen(7), **kw).images
    assert got.shape == (2, 8, 8, 1) and np.array_equal(got, want)
    # the parameterisation matters: the same net read as ε gives other images
    eps_sched = DDPMScheduler.from_config(sched.config, prediction_type="epsilon")
    other = o2mkd_pipe(unet, sched_name, eps_sched)(generator=gen(7), **kw).images
    assert not np.allclose(other, want, atol=1e-3)


# ------------------------------------------------------------------------------------------------------------
# evaluation and distillation


def oracle_v(x_0, scheduler):
    """A perfect v-prediction 'teacher' of a one-image data set: recovers ε from x_t and returns the velocity."""

    def fn(x_t, t):
        a = abar(scheduler, t.cpu()).to(x_t)
        eps = (x_t - a.sqrt() * x_0) / (1 - a).sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x_0

    return fn


def test_teacher_task_mse_compares_with_the_velocity():
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    x_0 = torch.rand(1, 8, 8, generator=gen(5)) * 2 - 1
    multi = MultiStudentUNet([conftest.tiny_unet(1, 8)], boundaries=(0, 1000)).eval()
    df = teacher_agreement(multi, oracle_v(x_0, sched), sched, [(x_0,)], num_samples=32, num_buckets=4,
                           batch_size=16)
    assert df["teacher_task_mse"].max() < 1e-8  # an ε target would give ‖v − ε‖² ≈ O(1)


def test_local_engine_distils_a_tiny_v_prediction_teacher(v_teacher_dir, tmp_path):
    """run_local on pipelines/tiny.yaml with a v-prediction teacher: students move towards the teacher's raw
    (velocity) outputs; the task loss (its target the velocity) is on."""
    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.engine.session import run_local

    base = load_config(TINY, [f"teacher.pretrained={v_teacher_dir}"]).to_dict()
    cfg = from_dict(base, ["mlflow.enabled=false", "eval.enabled=false", "kd.lambda_task=0.1", "train.steps=30",
                           "train.checkpoint_every=30", "train.lr=0.003"])
    report = run_local(cfg, tmp_path / "run", progress=False)
    assert [s["steps"] for s in report["segments"]] == [30, 30, 30]

    teacher, sched = load_teacher(cfg.teacher)
    bounds = report["boundaries"]
    before = MultiStudentUNet(build_students(cfg, teacher, 3), boundaries=bounds).eval()
    after = O2MKDPipeline.from_pretrained(tmp_path / "run" / "pipeline").students.eval()
    assert after.config.boundaries == bounds
    x = [(torch.rand(1, 8, 8, generator=gen(i)) * 2 - 1,) for i in range(16)]
    kw = {"num_samples": 96, "num_buckets": 3, "batch_size": 48}
    mse0 = teacher_agreement(before, teacher, sched, x, **kw)
    mse1 = teacher_agreement(after, teacher, sched, x, **kw)
    m0, m1 = (float((df["mse"] * df["n"]).sum() / df["n"].sum()) for df in (mse0, mse1))
    print(f"v-prediction teacher: student-vs-teacher output MSE {m0:.4g} before, {m1:.4g} after")
    assert m1 < 0.8 * m0
