"""A tiny Stable Diffusion teacher distilled one-to-many through the Ray engine for real: the shared teacher actor
serves the conditional UNet (text embeddings in every request), two TorchTrainers train BK-SDM-style students
concurrently, the result is an O2MKDStableDiffusionPipeline sampled with guidance, tracked in MLflow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PROMPTS, ROOT, run_cli, sd_overrides

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def sd_run(ray_local, tiny_sd_dir, prompts_file, tmp_path_factory):
    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.engine.driver import run_distillation

    root = tmp_path_factory.mktemp("sd_engine")
    cfg = load_config(ROOT / "pipelines" / "tiny.yaml", [
        *sd_overrides(tiny_sd_dir, prompts_file), "mlflow.enabled=true",
        f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db", "mlflow.experiment=sd", "eval.enabled=true",
        "eval.num_images=4", "eval.steps=3", "train.steps=8", "train.checkpoint_every=4", "sampling.scheduler=dpm"])
    seen: list[tuple[int, int]] = []
    report = run_distillation(cfg, root / "run", progress=False, on_progress=lambda k, m: seen.append((k, m["step"])))
    return cfg, root / "run", report, seen


def test_sd_students_train_concurrently_on_the_shared_conditional_teacher(sd_run):
    cfg, out, report, seen = sd_run
    segs = report["segments"]
    assert [s["boundaries"] for s in segs] == [[0, 500], [500, 1000]] and [s["steps"] for s in segs] == [8, 8]
    assert max(s["started_at"] for s in segs) < min(s["finished_at"] for s in segs)  # concurrent
    assert sorted(seen) == [(k, s) for k in range(2) for s in (4, 8)]
    t = report["teacher"]
    # the actor answered both segments (targets + held-out batches) and the latent synthesis (3 DDIM steps)
    assert t["mode"] == "actor" and t["requests_by_segment"]["synth"] == 3
    assert t["requests_by_segment"]["seg-00"] >= 8 and t["requests_by_segment"]["seg-01"] >= 8
    # BK-SDM-style half-width students: no mid block, cheaper per step than the teacher
    assert 0 < report["macs_ratio_per_step"] < 0.5
    assert all(s["params"] < t["params"] for s in segs)
    assert len(list((out / "cache").glob("cond-*.safetensors"))) == 1


def test_sd_pipeline_folder_samples_with_guidance_and_any_scheduler(sd_run, tiny_sd_dir):
    from diffusers import DDIMScheduler, PNDMScheduler

    from o2mkd_ray.pipelines.stable_diffusion import O2MKDStableDiffusionPipeline

    _, out, report, _ = sd_run
    d = out / "pipeline"
    assert {p.name for p in d.iterdir()} >= {"unet", "vae", "text_encoder", "tokenizer", "scheduler",
                                             "model_index.json"}
    pipe = O2MKDStableDiffusionPipeline.from_pretrained(d)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"  # sampling.scheduler=dpm
    assert pipe.unet.num_students == 2 and pipe.unet.student(0).mid_block is None  # drop_mid_block=true
    imgs = {}
    for name, sched in (("dpm", None), ("ddim", DDIMScheduler), ("pndm", PNDMScheduler)):
        if sched is not None:
            pipe.scheduler = sched.from_config(pipe.scheduler.config)
        for gs in (1.0, 6.0):
            imgs[name, gs] = pipe("a red square", negative_prompt="blurry", guidance_scale=gs, num_inference_steps=4,
                                  generator=torch.Generator().manual_seed(1), output_type="np").images
            assert imgs[name, gs].shape == (1, 16, 16, 3) and np.isfinite(imgs[name, gs]).all()
    assert not np.array_equal(imgs["ddim", 1.0], imgs["ddim", 6.0])  # guidance changes the result
    assert report["samples"]["prompts"] == PROMPTS[:3] and (out / "samples.png").stat().st_size > 0


def test_sd_run_quick_eval_and_mlflow(sd_run):
    from mlflow.tracking import MlflowClient

    cfg, out, report, _ = sd_run
    ev = report["eval"]
    assert 0 < ev["macs_ratio_run"] < 0.5 and np.isfinite(ev["pixel_mse"]) and ev["latency_speedup"] > 0
    assert (out / "eval" / "samples.png").is_file() and (out / "eval" / "metrics.json").is_file()
    info = report["mlflow"]
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["teacher.kind"] == "auto" and run.data.params["data.kind"] == "prompts"
    assert "eval/pixel_mse" in run.data.metrics
    names = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"pipeline", "samples.png", "eval", "report.json"} <= names, names


def test_sd_rerun_resumes_without_retraining(sd_run):
    from o2mkd_ray.engine.driver import run_distillation

    cfg, out, first, _ = sd_run
    cfg.eval.enabled = False
    again = run_distillation(cfg, out, progress=False)
    assert [s["steps"] for s in again["segments"]] == [8, 8]
    assert again["teacher"]["requests"] == 0  # every segment was finished: no teacher service, no new data
    assert again["segments"][0]["finished_at"] == first["segments"][0]["finished_at"]


def test_cli_samples_the_sd_pipeline_with_prompts(sd_run, tmp_path):
    _, out, _, _ = sd_run
    png = tmp_path / "cli.png"
    r = run_cli("sample", str(out / "pipeline"), "--prompt", "a cat", "--prompt", "a dog", "--num-images", "2",
                "--steps", "3", "--scheduler", "ddim", "--guidance-scale", "4", "--output", str(png))
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 0 and r.stdout.strip().endswith("cli.png")
    r = run_cli("sample", str(out / "pipeline"), "--steps", "3")
    assert r.returncode == 2 and "give at least one --prompt" in r.stderr
