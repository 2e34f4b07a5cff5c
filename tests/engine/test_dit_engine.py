"""A tiny class-conditional DiT teacher distilled one-to-many for real: recognised from its folder and checked in
one line before any Ray work, distilled into half-depth, half-head transformer students by the local engine (they
learn: agreement with the teacher on held-out class labels improves over the untrained students) and by the Ray
engine (the shared teacher actor serves both segments, class labels in every request), exported as an
O2MKDDiTPipeline that the CLI samples with --class-label."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli

from o2mkd_ray.errors import ConfigError


def dit_config(dit_dir, *extra: str):
    """pipelines/dit_tiny.yaml on the tiny DiT fixture, at test size (2 segments, a few steps, 16 latents)."""
    from o2mkd_ray.config.loading import load_config

    return load_config(ROOT / "pipelines" / "dit_tiny.yaml", [
        f"teacher.pretrained={dit_dir}", "segments.n=2", "data.synth_samples=16", "data.synth_steps=2",
        "train.batch_size=8", "train.val_batches=1", "sampling.steps=2", "sampling.num_images=2",
        "eval.enabled=false", "mlflow.enabled=false", *extra])


# ---------------------------------------------------------------------------------------------- no Ray, fast
def test_a_dit_folder_is_recognised_and_checked(tiny_dit_dir):
    from o2mkd_ray.core.teacher import teacher_kind
    from o2mkd_ray.core.teacher_checks import check_run

    cfg = dit_config(tiny_dit_dir)
    assert cfg.teacher.kind == "auto" and teacher_kind(cfg.teacher) == "dit"
    check_run(cfg)  # the yaml as shipped passes the pre-flight


@pytest.mark.parametrize("extra, needle", [
    (["data.kind=digits"], "data.kind: a DiT teacher distils on class-labelled latents; set data.kind=classes"),
    (["kd.lambda_feat=0.1"], "kd.lambda_feat: feature KD matches UNet blocks"),
    (["students.layers_per_block=1"], "students.layers_per_block: a UNet option"),
    (["students.width=1.5"], "students.width: must be a number in (0, 1]"),
    (["students.depth=[0.5, 0.5, 0.5]"], "students.depth: got 3 values for 2 segments"),
])
def test_bad_dit_configs_are_refused_in_one_line(tiny_dit_dir, extra, needle):
    from o2mkd_ray.core.teacher_checks import check_run

    with pytest.raises(ConfigError) as e:
        check_run(dit_config(tiny_dit_dir, *extra))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_incomplete_dit_folder_and_bad_class_folder_are_refused(tiny_dit_dir, tmp_path):
    from o2mkd_ray.core.teacher_checks import check_run

    broken = tmp_path / "dit"
    shutil.copytree(tiny_dit_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ConfigError, match=r"is not a complete DiT folder \(missing vae/\)"):
        check_run(dit_config(broken))
    (tmp_path / "imgs" / "not-a-class").mkdir(parents=True)
    with pytest.raises(ConfigError, match="subfolder 'not-a-class' names no class of the teacher"):
        check_run(dit_config(tiny_dit_dir, f"data.path={tmp_path / 'imgs'}"))


def test_class_folder_latents_are_the_vae_encodings_with_their_labels(tiny_dit_dir, tmp_path):
    """A folder with one subfolder per class (by id, or by an id2label name) becomes VAE latents + labels."""
    from PIL import Image

    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.data.class_data import build_class_data

    for sub, color in (("3", (255, 0, 0)), ("goldfish", (0, 0, 255))):
        (tmp_path / "imgs" / sub).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 20), color).save(tmp_path / "imgs" / sub / f"{i}.png")
    cfg = dit_config(tiny_dit_dir, f"data.path={tmp_path / 'imgs'}")
    teacher, sched = load_teacher(cfg.teacher)
    data = build_class_data(cfg, teacher, dict(sched.config), log=lambda m: None)
    assert data["latents"].shape == (4, 4, 8, 8) and data["class_labels"].tolist() == [3, 3, 1, 1]
    assert data["uncond_class_labels"].tolist() == [1000]  # DiT's null class
    assert not np.allclose(data["latents"][0], data["latents"][2])  # red and blue images differ


# ------------------------------------------------------------------------------------- local engine, end to end
@pytest.fixture(scope="module")
def dit_local(tiny_dit_dir, tmp_path_factory):
    from o2mkd_ray.engine.session import run_local

    cfg = dit_config(tiny_dit_dir, "train.steps=40", "train.checkpoint_every=40", "train.lr=0.003",
                     "train.warmup_steps=2")
    out = tmp_path_factory.mktemp("dit_local") / "run"
    return cfg, out, run_local(cfg, out, progress=False)


def test_local_dit_students_learn_the_teacher_on_held_out_classes(dit_local):
    """`o2mkd-ray eval RUN`'s evaluation: the trained students agree with the teacher better than the untrained
    (teacher-initialised) ones, on class labels the run never trained on."""
    from o2mkd_ray.data.class_data import build_class_data
    from o2mkd_ray.eval.evaluate import evaluate_run
    from o2mkd_ray.pipelines.dit import O2MKDDiTPipeline

    cfg, out, report = dit_local
    assert [s["boundaries"] for s in report["segments"]] == [[0, 500], [500, 1000]]
    multi = O2MKDDiTPipeline.from_pretrained(out / "pipeline").transformer
    # half the blocks, half the heads, the whole learned-sigma output (a drop-in replacement)
    assert multi.num_students == 2 and multi.student(0).config.num_layers == 2
    assert multi.student(0).config.num_attention_heads == 2 and multi.student(0).config.out_channels == 8
    ev = evaluate_run(out, num_images=2, steps=2, agreement_samples=32)
    trained = build_class_data(cfg, None, None, cache_dir=out / "cache", log=lambda m: None)["class_labels"]
    assert len(ev["held_out_labels"]) == 16 and not set(ev["held_out_labels"]) & set(trained.tolist())
    m = ev["metrics"]
    assert m["agreement_mse"] < 0.8 * m["agreement_mse_untrained"], m
    assert 0 < m["macs_ratio_run"] < 1 and np.isfinite(m["pixel_mse"]) and (out / "eval" / "samples.png").is_file()
    # the FID proxy of the students' images against the teacher's, its feature space named, and both latencies
    assert ev["fid_backend"] and "kid_o2mkd_vs_teacher" in m and m["o2mkd_s_per_image"] > 0
    assert ev["latency"]["repeats"] == 3 and m["teacher_s_per_image"] > 0 and m["latency_speedup"] > 0


def test_local_dit_pipeline_samples_through_the_cli_with_class_labels(dit_local, tmp_path):
    _, out, report = dit_local
    assert json.loads((out / "pipeline" / "model_index.json").read_text())["_class_name"] == "O2MKDDiTPipeline"
    assert report["samples"]["class_labels"] == [0, 1] and 0 < report["macs_ratio_per_step"] < 1
    png = tmp_path / "cli.png"
    r = run_cli("sample", str(out / "pipeline"), "--class-label", "3", "--class-label", "7", "--num-images", "2",
                "--steps", "2", "--guidance-scale", "4", "--output", str(png))
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 0 and r.stdout.strip().endswith("cli.png")


def test_local_dit_pipeline_as_an_mlflow_pyfunc_model_takes_a_class_label(dit_local):
    """The wrapper MLflow serves a run's pipeline with, loaded from the folder as MLflow hands it over."""
    from types import SimpleNamespace

    from o2mkd_ray.tracking.pyfunc import PipelineModel

    _, out, _ = dit_local
    model = PipelineModel()
    model.load_context(SimpleNamespace(artifacts={"pipeline": str(out / "pipeline")}))
    a, b = (model.predict(None, {"class_label": [k], "num_images": [2], "steps": [2], "seed": [0]}) for k in (3, 7))
    assert a.shape == (2, 16, 16, 3) and a.dtype == np.float32 and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="give a 'class_label'"):
        model.predict(None, {"num_images": [1], "steps": [2]})


def test_tune_objectives_cost_and_the_analysis_proposal_take_a_dit_teacher(dit_local):
    """What a Tune trial computes after its distillation (sampling cost, agreement and fidelity objectives), and
    `analyze`'s feature statistics and boundary proposal, on a class-conditional transformer teacher: the
    statistics hook its transformer blocks, the fidelity objective is the pixel error of `o2mkd-ray eval`'s
    class-conditional evaluation."""
    from o2mkd_ray.core.teacher import load_teacher, sample_shape
    from o2mkd_ray.tune.analysis import feature_stats, propose_boundaries
    from o2mkd_ray.tune.space import check_students, parse_space
    from o2mkd_ray.tune.trial import objective_value, sampling_cost

    cfg, out, report = dit_local
    teacher, scheduler = load_teacher(cfg.teacher)
    # the search's pre-flight builds a transformer student for every width the space can give
    check_students(parse_space({"students.width": {"per_segment_choice": [0.25, 0.5, 1.0]}}), teacher, cfg.to_dict())
    cfg = cfg.model_copy(deep=True)
    cfg.segments.boundaries = [s["boundaries"][0] for s in report["segments"]] + [1000]
    cost = sampling_cost(cfg, teacher, sample_shape(teacher, cfg.data.channels, cfg.data.resolution),
                         scheduler.config)
    assert cost["cost"] == pytest.approx(report["macs_ratio_per_step"]) and 0 < cost["cost"] < 1
    agreement = objective_value(cfg, out, "agreement", teacher, scheduler, samples=16)
    fidelity = objective_value(cfg, out, "fidelity", teacher, scheduler, images=2, steps=2)
    assert np.isfinite(agreement["quality"]) and agreement["quality"] > 0
    assert fidelity["quality"] == fidelity["fidelity_mse"] > 0 and np.isfinite(fidelity["fidelity_psnr_db"])

    stats = feature_stats(cfg, num_images=4, num_timesteps=8, out=out)  # the run's cached latents and labels
    assert sorted(set(stats["block"])) == [f"transformer_blocks.{i}" for i in range(4)]
    assert stats.groupby("block")["std"].nunique().min() == 8  # the activations move with t in every block
    b = propose_boundaries(cfg, 3, stats=stats)
    assert len(b) == 4 and b[0] == 0 and b[-1] == 1000 and b == sorted(set(b)), b


# --------------------------------------------------------------------------------------------------- Ray engine
@pytest.mark.ray
def test_ray_dit_teacher_actor_serves_both_segments_with_class_labels(ray_local, tiny_dit_dir, tmp_path):
    from o2mkd_ray.engine.driver import run_distillation
    from o2mkd_ray.pipelines.build import saved_pipeline_class

    cfg = dit_config(tiny_dit_dir, "train.steps=4", "train.checkpoint_every=4", "ray.cpus_per_worker=0.5")
    report = run_distillation(cfg, tmp_path / "run", progress=False)
    t = report["teacher"]
    # the actor sampled the class-labelled latents (2 DDIM steps) and answered both segments' targets
    assert t["mode"] == "actor" and t["requests_by_segment"]["synth"] == 2
    assert t["requests_by_segment"]["seg-00"] >= 4 and t["requests_by_segment"]["seg-01"] >= 4
    assert [s["steps"] for s in report["segments"]] == [4, 4]
    pipe = saved_pipeline_class(tmp_path / "run" / "pipeline").from_pretrained(tmp_path / "run" / "pipeline")
    img = pipe(class_labels=[5], num_inference_steps=2, guidance_scale=4.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()
