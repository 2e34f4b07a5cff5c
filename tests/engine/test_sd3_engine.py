"""A tiny Stable Diffusion 3 teacher (MMDiT, flow matching, no T5) distilled one-to-many for real: recognised from its
folder and checked in one line before any Ray work; trained by flow matching (each segment's float t from the
scheduler's shifted distribution restricted to the segment, x_t by scale_noise, the teacher's velocity as target);
through the Ray engine (the shared teacher actor serves prompt embeddings + pooled projections for both segments,
eval, MLflow) and the local one (the students learn: agreement with the teacher beats the untrained students);
exported as an O2MKDStableDiffusion3Pipeline whose every sampling step runs on the student trained on that t."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli

from o2mkd_ray.errors import ConfigError


def sd3_config(sd3_dir, prompts_file, *extra: str):
    """pipelines/sd3_tiny.yaml on the tiny SD3 fixture, at test size (2 segments, a few steps, 12 prompts)."""
    from o2mkd_ray.config.loading import load_config

    return load_config(ROOT / "pipelines" / "sd3_tiny.yaml", [
        f"teacher.pretrained={sd3_dir}", f"data.path={prompts_file}", "segments.boundaries=[0,600,1000]",
        "data.synth_steps=2", "train.batch_size=6", "train.val_batches=1", "sampling.steps=3",
        "sampling.num_images=2", "eval.enabled=false", "mlflow.enabled=false", *extra])


# ---------------------------------------------------------------------------------------------- no Ray, fast
def test_an_sd3_folder_is_recognised_and_checked(tiny_sd3_dir, prompts_file):
    from o2mkd_ray.core.teacher import teacher_kind
    from o2mkd_ray.core.teacher_checks import check_run

    cfg = sd3_config(tiny_sd3_dir, prompts_file)
    assert cfg.teacher.kind == "auto" and teacher_kind(cfg.teacher) == "sd3"
    check_run(cfg)  # the yaml as shipped passes the pre-flight


@pytest.mark.parametrize("extra, needle", [
    (["sampling.scheduler=ddim"], "sampling.scheduler: 'ddim' is not a flow-matching scheduler"),
    (["kd.lambda_feat=0.1"], "kd.lambda_feat: feature KD matches UNet blocks, which an SD3 teacher"),
    (["students.layers_per_block=1"], "students.layers_per_block: a UNet option"),
    (["data.kind=digits"], "data.kind: a Stable Diffusion teacher distils on captions"),
    (["students.depth=[0.5, 0.5, 0.5]"], "students.depth: got 3 values for 2 segments"),
])
def test_bad_sd3_configs_are_refused_in_one_line(tiny_sd3_dir, prompts_file, extra, needle):
    from o2mkd_ray.core.teacher_checks import check_run

    with pytest.raises(ConfigError) as e:
        check_run(sd3_config(tiny_sd3_dir, prompts_file, *extra))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_incomplete_sd3_folder_is_refused(tiny_sd3_dir, prompts_file, tmp_path):
    from o2mkd_ray.core.teacher_checks import check_run

    broken = tmp_path / "sd3"
    shutil.copytree(tiny_sd3_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(ConfigError, match=r"is not a complete Stable Diffusion 3 folder \(missing text_encoder_2/\)"):
        check_run(sd3_config(broken, prompts_file))


def test_flow_matching_training_inputs_of_a_segment(tiny_sd3_dir, prompts_file):
    """The distiller's draws for a segment: float t inside it (the scheduler's shifted distribution: its mass
    moves up), x_t = (1 - t/T) x_0 + (t/T) eps, target the velocity eps - x_0."""
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.distill.distiller import SegmentDistiller

    cfg = sd3_config(tiny_sd3_dir, prompts_file, "data.random_flip=false")
    teacher, sched = load_teacher(cfg.teacher)
    segs = Segments([0, 600, 1000])
    student = build_students(cfg, teacher, 2)[0]
    dist = SegmentDistiller(cfg, 0, segs, sched, student, None)
    x_0 = torch.randn(512, 16, 2, 2)
    g = torch.Generator().manual_seed(0)
    x_t, t, target = dist.make_inputs(x_0, generator=g)
    assert t.is_floating_point() and bool(((t >= 0) & (t < 600)).all()) and not torch.equal(t, t.floor())
    # the shift moves the mass up: s is uniform on [~0.003, 1/3] (the unshifted ends of [0, 0.6]) and
    # sigma = 3s / (1 + 2s) > 0.3 for s > 1/8, so P(t > 300) = 0.625 (0.5 without a shift: uniform t)
    assert abs(float((t > 300).float().mean()) - 0.625) < 0.06
    s = (t / 1000).view(-1, 1, 1, 1)
    eps_back = (x_t - (1 - s) * x_0) / s  # the noise x_t carries
    torch.testing.assert_close(target, eps_back - x_0, rtol=1e-3, atol=1e-3)


def test_tune_cost_counts_the_sd3_forward_report_json_counts(tiny_sd3_dir, prompts_file):
    """Tune's cost of an SD3 config counts the transformer at the text length the run's report counts: 77 CLIP
    tokens, then 256 T5 ones (the joint sequence encode_prompt gives, zeros without T5)."""
    from o2mkd_ray.core.costs import forward_cost
    from o2mkd_ray.core.teacher import load_teacher, sample_shape
    from o2mkd_ray.tune.trial import sampling_cost, text_length

    cfg = sd3_config(tiny_sd3_dir, prompts_file)
    teacher, sched = load_teacher(cfg.teacher)
    shape = sample_shape(teacher, 16, 8)
    assert text_length(cfg) == 333
    cost = sampling_cost(cfg, teacher, shape, sched.config)
    assert cost["teacher_macs"] == forward_cost(teacher, shape, 333)["macs"] != forward_cost(teacher, shape, 77)["macs"]
    assert 0 < cost["cost"] < 1 and sum(cost["steps_per_student"]) == cfg.sampling.steps


# ------------------------------------------------------------------------------- Ray engine, one run, shared
@pytest.fixture(scope="module")
def sd3_ray_run(ray_local, tiny_sd3_dir, prompts_file, tmp_path_factory):
    from o2mkd_ray.engine.driver import run_distillation

    root = tmp_path_factory.mktemp("sd3_engine")
    cfg = sd3_config(tiny_sd3_dir, prompts_file, "mlflow.enabled=true", f"mlflow.tracking_uri=sqlite:///{root}/m.db",
                     "mlflow.experiment=sd3", "eval.enabled=true", "eval.num_images=2", "eval.steps=2",
                     "train.steps=4", "train.checkpoint_every=4", "ray.cpus_per_worker=0.5")
    report = run_distillation(cfg, root / "run", progress=False)
    return cfg, root / "run", report


@pytest.mark.ray
def test_sd3_teacher_actor_serves_both_segments_with_pooled_projections(sd3_ray_run):
    from safetensors import safe_open

    _, out, report = sd3_ray_run
    assert [s["boundaries"] for s in report["segments"]] == [[0, 600], [600, 1000]]
    assert [s["steps"] for s in report["segments"]] == [4, 4]
    t = report["teacher"]
    assert t["mode"] == "actor" and t["requests_by_segment"]["synth"] == 2  # latents synthesised on the actor
    assert t["requests_by_segment"]["seg-00"] >= 4 and t["requests_by_segment"]["seg-01"] >= 4
    (cache,) = list((out / "cache").glob("cond-*.safetensors"))
    with safe_open(str(cache), framework="pt") as f:
        assert {"embeds", "pooled_projections", "uncond", "uncond_pooled_projections"} <= set(f.keys())
        # 77 CLIP tokens then 256 T5 tokens (zeros: the fixture has no T5), joint_attention_dim 48
        assert tuple(f.get_tensor("embeds").shape) == (12, 333, 48)
        assert tuple(f.get_tensor("pooled_projections").shape) == (12, 32)
    assert 0 < report["macs_ratio_per_step"] < 1


@pytest.mark.ray
def test_each_sampling_step_runs_on_the_student_trained_on_its_float_timestep(sd3_ray_run):
    """The boundaries stored with the exported pipeline are the ones training used (each segment's checkpoint
    manifest), and at every step of O2MKDStableDiffusion3Pipeline (shifted, fractional timesteps) the student
    called is the one whose training segment holds that t."""
    from o2mkd_ray.pipelines.stable_diffusion_3 import O2MKDStableDiffusion3Pipeline

    _, out, _ = sd3_ray_run
    trained = []
    for k in range(2):
        summary = json.loads((out / "segments" / f"seg-{k:02d}" / "summary.json").read_text())
        manifest = json.loads((Path(summary["checkpoint"]) / "manifest.json").read_text())
        assert manifest["segment"] == k
        trained.append(manifest["boundaries"][k:k + 2])
    pipe = O2MKDStableDiffusion3Pipeline.from_pretrained(out / "pipeline")
    multi = pipe.transformer
    assert list(multi.config.boundaries) == [0, 600, 1000] == [trained[0][0], *[r[1] for r in trained]]
    calls = []
    for k in range(multi.num_students):
        multi.student(k).register_forward_pre_hook(
            lambda m, a, kw, k=k: calls.append((k, kw["timestep"].flatten().tolist())), with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    pipe("a red square", num_inference_steps=7, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
         output_type="latent")
    seen = [(k, t) for k, ts in calls for t in ts]
    assert len(calls) == 7 and {k for k, _ in seen} == {0, 1}
    assert any(t != int(t) for _, t in seen)  # the shift makes them fractional
    for k, t in seen:
        lo, hi = trained[k]
        assert lo <= t < hi or (k == 1 and t == hi), (k, t, trained)  # t = T (sigma 1) is the last segment's


@pytest.mark.ray
def test_sd3_pipeline_round_trips_samples_through_the_cli_and_is_tracked(sd3_ray_run, tmp_path):
    from mlflow.tracking import MlflowClient

    from o2mkd_ray.pipelines.stable_diffusion_3 import O2MKDStableDiffusion3Pipeline

    _, out, report = sd3_ray_run
    d = out / "pipeline"
    assert json.loads((d / "model_index.json").read_text())["_class_name"] == "O2MKDStableDiffusion3Pipeline"
    pipe = O2MKDStableDiffusion3Pipeline.from_pretrained(d)
    pipe.save_pretrained(tmp_path / "again")
    again = O2MKDStableDiffusion3Pipeline.from_pretrained(tmp_path / "again")
    kw = {"negative_prompt": "blurry", "num_inference_steps": 2, "output_type": "np"}
    a, b = (p("a red square", guidance_scale=5.0, generator=torch.Generator().manual_seed(0), **kw).images
            for p in (pipe, again))
    c = pipe("a red square", guidance_scale=1.0, generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, 16, 16, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    png = tmp_path / "sd3.png"
    r = run_cli("sample", str(d), "--prompt", "a cat", "--num-images", "2", "--steps", "2", "--output", str(png))
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 0
    ev = report["eval"]
    assert 0 < ev["macs_ratio_run"] < 1 and np.isfinite(ev["pixel_mse"]) and np.isfinite(ev["fid_o2mkd_vs_teacher"])
    assert ev["latency_speedup"] > 0
    client = MlflowClient(report["mlflow"]["tracking_uri"])
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and "eval/pixel_mse" in run.data.metrics
    assert "pipeline" in {x.path for x in client.list_artifacts(report["mlflow"]["run_id"])}


# ---------------------------------------------------------------------------------------------- local engine
def test_local_sd3_students_learn_the_teacher_velocity(tiny_sd3_dir, prompts_file, tmp_path):
    """Distilled students agree with the teacher better than the untrained (teacher-initialised) ones, on the
    run's caption latents with their own captions' conditioning (tune's agreement objective)."""
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.engine.session import run_local
    from o2mkd_ray.pipelines.build import build_sd_pipeline, teacher_sd_pipeline
    from o2mkd_ray.tune.trial import objective_value

    cfg = sd3_config(tiny_sd3_dir, prompts_file, "train.steps=30", "train.checkpoint_every=30",
                     "train.lr=0.003", "train.warmup_steps=2", "sampling.steps=2", "sampling.num_images=1")
    run_local(cfg, tmp_path / "trained", progress=False)
    teacher, sched = load_teacher(cfg.teacher)
    untrained = tmp_path / "untrained"
    build_sd_pipeline(build_students(cfg, teacher, 2), [0, 600, 1000], teacher_sd_pipeline(cfg, teacher),
                      cfg.sampling.scheduler).save_pretrained(untrained / "pipeline")
    shutil.copytree(tmp_path / "trained" / "cache", untrained / "cache")  # the same caption latents
    before = objective_value(cfg, untrained, "agreement", teacher, sched, samples=48)["quality"]
    after = objective_value(cfg, tmp_path / "trained", "agreement", teacher, sched, samples=48)["quality"]
    assert after < 0.8 * before, (before, after)

    # analyze on the same caption latents: the joint blocks' image stream (element 1 of what they return; the last
    # block returns no text stream at all) along the flow-matching t axis, and a boundary proposal from it
    from o2mkd_ray.core.features import FeatureHooks
    from o2mkd_ray.tune.analysis import feature_stats, propose_boundaries

    c = teacher.config
    with FeatureHooks(teacher, ["transformer_blocks.0"], detach=True) as hooks, torch.no_grad():
        teacher(torch.randn(1, c.in_channels, c.sample_size, c.sample_size), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 5, c.joint_attention_dim),
                pooled_projections=torch.randn(1, c.pooled_projection_dim))
    assert hooks.features["transformer_blocks.0"].shape == (1, (c.sample_size // c.patch_size) ** 2,
                                                            c.num_attention_heads * c.attention_head_dim)
    stats = feature_stats(cfg, num_images=4, num_timesteps=6, out=tmp_path / "trained")
    assert sorted(set(stats["block"])) == [f"transformer_blocks.{i}" for i in range(c.num_layers)]
    assert stats.groupby("block")["std"].nunique().min() == 6  # the activations move with t in every block
    b = propose_boundaries(cfg, 3, stats=stats)
    assert len(b) == 4 and b[0] == 0 and b[-1] == 1000 and b == sorted(set(b)), b


@pytest.mark.parametrize("name", ["sd3_tiny", "sd3_medium"])
def test_sd3_example_configs_pass_the_dry_run(name, tiny_sd3_dir, tmp_path):
    from o2mkd_ray.cli import main

    extra = ["--set", f"teacher.pretrained={tiny_sd3_dir}"] if name == "sd3_tiny" else []
    yaml = str(ROOT / "pipelines" / f"{name}.yaml")
    assert main(["distill", yaml, "--dry-run", "--out", str(tmp_path / "d"), *extra]) == 0
