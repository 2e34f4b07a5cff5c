"""A tiny SDXL teacher distilled one-to-many through both engines: the shared teacher actor serves the text_time
UNet (text embeddings, pooled embeddings and time ids in every request), students train concurrently, the result
is an O2MKDStableDiffusionXLPipeline that `sample` and `eval` use, tracked in MLflow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli, sd_overrides

pytestmark = pytest.mark.ray


def _cfg(tiny_sdxl_dir, prompts_file, *extra):
    from o2mkd_ray.config.loading import load_config

    return load_config(ROOT / "pipelines" / "tiny.yaml", [*sd_overrides(tiny_sdxl_dir, prompts_file), *extra])


@pytest.fixture(scope="module")
def sdxl_run(ray_local, tiny_sdxl_dir, prompts_file, tmp_path_factory):
    from o2mkd_ray.engine.driver import run_distillation

    root = tmp_path_factory.mktemp("sdxl_engine")
    cfg = _cfg(tiny_sdxl_dir, prompts_file, "mlflow.enabled=true", f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
               "mlflow.experiment=sdxl", "eval.enabled=true", "eval.num_images=2", "eval.steps=3", "train.steps=6",
               "train.checkpoint_every=3")
    report = run_distillation(cfg, root / "run", progress=False)
    return cfg, root / "run", report


def test_sdxl_students_train_on_the_shared_teacher_with_added_conditions(sdxl_run):
    cfg, out, report = sdxl_run
    segs = report["segments"]
    assert [s["boundaries"] for s in segs] == [[0, 500], [500, 1000]] and [s["steps"] for s in segs] == [6, 6]
    t = report["teacher"]
    assert t["mode"] == "actor" and t["requests_by_segment"]["synth"] == 3  # latents synthesised on the actor
    assert t["requests_by_segment"]["seg-00"] >= 6 and t["requests_by_segment"]["seg-01"] >= 6
    assert 0 < report["macs_ratio_per_step"] < 0.5
    from safetensors import safe_open

    (cache,) = list((out / "cache").glob("cond-*.safetensors"))
    with safe_open(str(cache), framework="pt") as f:
        assert {"pooled", "time_ids", "uncond_pooled", "uncond_time_ids"} <= set(f.keys())
        assert f.get_tensor("time_ids")[0].tolist() == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]  # 8 latents x VAE 2


def test_sdxl_pipeline_folder_samples_through_the_cli_and_mlflow(sdxl_run, tmp_path):
    from mlflow.tracking import MlflowClient

    from o2mkd_ray.pipelines.stable_diffusion_xl import O2MKDStableDiffusionXLPipeline

    _, out, report = sdxl_run
    d = out / "pipeline"
    assert {"text_encoder_2", "tokenizer_2", "unet", "vae"} <= {p.name for p in d.iterdir()}
    pipe = O2MKDStableDiffusionXLPipeline.from_pretrained(d)
    pipe.set_progress_bar_config(disable=True)
    a, b = (pipe("a red square", negative_prompt="blurry", guidance_scale=g, num_inference_steps=3,
                 generator=torch.Generator().manual_seed(0), output_type="np").images for g in (1.0, 5.0))
    assert a.shape == (1, 16, 16, 3) and np.isfinite(a).all() and not np.array_equal(a, b)
    png = tmp_path / "xl.png"
    r = run_cli("sample", str(d), "--prompt", "a cat", "--num-images", "2", "--steps", "3", "--output", str(png))
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 0
    ev = report["eval"]
    assert 0 < ev["macs_ratio_run"] < 0.5 and np.isfinite(ev["pixel_mse"])
    client = MlflowClient(report["mlflow"]["tracking_uri"])
    run = client.get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and "eval/pixel_mse" in run.data.metrics
    assert "pipeline" in {x.path for x in client.list_artifacts(report["mlflow"]["run_id"])}


def test_sdxl_local_engine_trains_koala_style_students(tiny_sdxl_dir, prompts_file, tmp_path):
    from o2mkd_ray.engine.session import run_local
    from o2mkd_ray.pipelines.stable_diffusion_xl import O2MKDStableDiffusionXLPipeline

    cfg = _cfg(tiny_sdxl_dir, prompts_file, "train.steps=4", "train.checkpoint_every=2",
               "students.transformer_layers_per_block=[1,1]")
    report = run_local(cfg, tmp_path / "local", progress=False)
    assert [s["steps"] for s in report["segments"]] == [4, 4]
    pipe = O2MKDStableDiffusionXLPipeline.from_pretrained(tmp_path / "local" / "pipeline")
    student = pipe.unet.student(0)
    # the tiny teacher has (1, 2) transformer layers; the config asked for (1, 1)
    assert len(student.down_blocks[1].attentions[0].transformer_blocks) == 1
    assert student.config.transformer_layers_per_block == [1, 1]


@pytest.mark.parametrize("name", ["sdxl_tiny", "sdxl_base"])
def test_sdxl_example_configs_pass_the_dry_run(name, tiny_sdxl_dir, tmp_path):
    from o2mkd_ray.cli import main

    extra = ["--set", f"teacher.pretrained={tiny_sdxl_dir}"] if name == "sdxl_tiny" else []
    assert main(["distill", str(ROOT / "pipelines" / f"{name}.yaml"), "--dry-run", "--out", str(tmp_path / "d"),
                 *extra]) == 0
