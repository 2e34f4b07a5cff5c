"""Evaluation: agreement, trajectory fidelity, FID/KID (fallback labelled), cost, report files, CLI hooks.

Run folders are built directly (config.json + pipeline/ exactly as ``driver.finish_run`` writes them, students
channel-sliced from the teacher) instead of training, to keep the module to seconds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import types

import numpy as np
import pytest
import torch
from conftest import ROOT
from torch import nn

from o2mkd_ray.cli.evaluate import add_eval_parser, run_eval_cli
from o2mkd_ray.config.loading import load_config
from o2mkd_ray.core.schedulers import make_scheduler
from o2mkd_ray.core.segments import Segments
from o2mkd_ray.core.students import build_students
from o2mkd_ray.core.teacher import TeacherFn, load_teacher
from o2mkd_ray.data.build import build_dataset
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.eval.evaluate import evaluate_run
from o2mkd_ray.eval.fid import (
    FID_WEIGHTS_ENV,
    fid_feature_space,
    frechet_distance,
    kernel_inception_distance,
    random_conv_features,
)
from o2mkd_ray.eval.measures import PSNR_CAP_DB
from o2mkd_ray.eval.metrics import segment_summary, teacher_agreement, trajectory_fidelity
from o2mkd_ray.pipelines.build import build_pipeline
from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet
from o2mkd_ray.pipelines.unconditional import O2MKDPipeline

SMALL = dict(agreement_samples=48, num_buckets=6, num_reference=64, latency_repeats=1)


def _cfg(teacher_dir, *extra):
    overrides = [f"teacher.pretrained={teacher_dir}", "mlflow.enabled=false", *extra]
    return load_config(ROOT / "pipelines" / "tiny.yaml", overrides)


def make_run_folder(out, teacher_dir, *extra):
    """A run folder as finish_run leaves it (config.json, pipeline/), students untrained from the teacher."""
    cfg = _cfg(teacher_dir, *extra)
    teacher, sched = load_teacher(cfg.teacher)
    seg = Segments.from_config(cfg.segments, sched.config.num_train_timesteps)
    out.mkdir(parents=True)
    (out / "config.json").write_text(cfg.to_json())
    pipe = build_pipeline(build_students(cfg, teacher, seg.n), seg.boundaries,
                          make_scheduler(cfg.sampling.scheduler, sched.config), cfg.data.value_range)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def run_dir(tiny_teacher_dir, tmp_path_factory):
    return make_run_folder(tmp_path_factory.mktemp("eval") / "run", tiny_teacher_dir)


@pytest.fixture(scope="module")
def report(run_dir, monkeypatch_module):
    monkeypatch_module.delenv(FID_WEIGHTS_ENV, raising=False)
    return evaluate_run(run_dir, num_images=6, steps=4, **SMALL)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def copies(tiny_teacher_dir):
    """Teacher, its training scheduler, and an O2MKD pipeline whose 3 students are exact teacher copies."""
    teacher, sched = load_teacher(_cfg(tiny_teacher_dir).teacher)
    multi = MultiStudentUNet([copy.deepcopy(teacher) for _ in range(3)], boundaries=[0, 333, 667, 1000])
    return teacher, sched, O2MKDPipeline(students=multi, scheduler=make_scheduler("ddpm", sched.config))


# ------------------------------------------------------------------------------------------------------------


def _walk(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, obj


def test_report_fields_present_and_finite(report, run_dir):
    text = (run_dir / "eval" / "report.json").read_text()

    def no_constants(c):
        raise AssertionError(f"report.json holds {c}")

    on_disk = json.loads(text, parse_constant=no_constants)  # NaN / Infinity are not JSON
    for key in ("agreement", "trajectory", "fid", "fid_backend", "fid_backend_reason", "cost", "latency",
                "metrics", "files", "null_reasons", "settings"):
        assert key in on_disk, key
    for path, v in _walk(on_disk):
        if v is None:
            assert path in on_disk["null_reasons"], f"{path} null without a reason"
        elif isinstance(v, float):
            assert math.isfinite(v), path
    assert on_disk["settings"]["num_images"] == 6 and on_disk["settings"]["steps"] == 4
    assert [r["segment"] for r in on_disk["agreement"]["per_segment"]] == [0, 1, 2]
    assert len(on_disk["trajectory"]["per_sample"]) == 6
    for pair in ("teacher_vs_data", "o2mkd_vs_data", "o2mkd_vs_teacher"):
        assert on_disk["fid"][pair]["fid"] >= 0 and on_disk["fid"][pair]["kid"] is not None
    # cost: 4 DDIM steps spread over the owners; width-0.5 students are cheaper than the teacher
    cost = on_disk["cost"]
    assert sum(s["steps_in_run"] for s in cost["students"]) == 4
    per_student = [s["macs_per_step"] * s["steps_in_run"] for s in cost["students"]]
    assert cost["o2mkd"]["macs_per_run"] == sum(per_student)
    assert 0 < cost["macs_ratio_run"] < 1
    assert on_disk["latency"]["teacher_s"] > 0 and on_disk["latency"]["o2mkd_s"] > 0
    assert "agreement_mse" in on_disk["metrics"]
    assert all(math.isfinite(v) for v in on_disk["metrics"].values())
    assert on_disk["metrics"]["agreement_mse"] > 0  # untrained width-0.5 students do differ from the teacher


def test_report_files_written(report, run_dir):
    ev = run_dir / "eval"
    names = {"report.json", "report.md", "samples_grid.png", "agreement_vs_t.png", "quality_vs_cost.png"}
    assert {p.split("/")[-1] for p in report["files"]} == names
    for n in names:
        assert (ev / n).is_file() and (ev / n).stat().st_size > 0, n
    for n in names - {"report.json", "report.md"}:
        assert (ev / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", n
    md = (ev / "report.md").read_text()
    assert "random-conv" in md and "Teacher agreement" in md and "student 2 [667, 1000)" in md
    assert json.loads((ev / "report.json").read_text())["files"] == report["files"]


def test_fid_fallback_labelled(report):
    assert report["fid_backend"] == "random-conv"
    assert "no Inception weights configured" in report["fid_backend_reason"]
    assert report["fid"]["comparable_to_published"] is False


def test_configured_but_unusable_weights_fall_back_with_reason(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(FID_WEIGHTS_ENV, raising=False)
    missing = fid_feature_space(str(tmp_path / "nope.pth"))
    assert missing.backend == "random-conv"
    assert "does not exist" in missing.reason and "FELL BACK" in missing.reason
    w = tmp_path / "weights-inception.pth"
    w.write_bytes(b"not really weights")
    for name in ("torch_fidelity", "torchmetrics", "cleanfid"):
        monkeypatch.setitem(sys.modules, name, None)  # import of these now raises ImportError
    monkeypatch.setenv(FID_WEIGHTS_ENV, str(w))
    with caplog.at_level("WARNING", logger="o2mkd_ray"):
        space = fid_feature_space(None)
    assert space.backend == "random-conv"
    assert f"${FID_WEIGHTS_ENV}" in space.reason and "torch-fidelity: not importable" in space.reason
    assert "FELL BACK" in caplog.text


def test_inception_backend_used_when_importable_and_configured(tmp_path, monkeypatch):
    class FakeInception(nn.Module):  # stands in for torch_fidelity's FeatureExtractorInceptionV3
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            assert features_list == ["2048"] and feature_extractor_weights_path == str(w)

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3  # torch-fidelity's input contract
            return (x.float().mean((2, 3)),)

    w = tmp_path / "weights-inception-2015-12-05.pth"
    w.write_bytes(b"")
    mod = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    mod.FeatureExtractorInceptionV3 = FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", mod)
    space = fid_feature_space(str(w))
    assert space.backend == "inception-torch-fidelity" and space.comparable_to_published
    f = space.extract(np.full((3, 8, 8, 1), 0.5, dtype=np.float32))
    assert f.shape == (3, 3) and np.allclose(f, 128.0)


def test_fid_kid_math():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([3.0, 0, 0, 0])
    assert frechet_distance(a, a + shift) == pytest.approx(9.0, rel=1e-6)  # |Δμ|², equal covariances
    b = rng.standard_normal((400, 4))
    kid_same, _ = kernel_inception_distance(a, b)
    kid_far, _ = kernel_inception_distance(a, b + 2.0)
    assert abs(kid_same) < 0.05 < kid_far
    assert math.isnan(frechet_distance(a[:1], b))  # < 2 samples: undefined, reported as null
    imgs = rng.random((5, 8, 8, 1)).astype(np.float32)
    f1, f2 = random_conv_features(imgs), random_conv_features(imgs)
    assert f1.shape == (5, 128) and np.array_equal(f1, f2) and np.isfinite(f1).all()


def test_trajectory_exact_when_students_copy_teacher(copies):
    teacher, sched, pipe = copies
    tr = trajectory_fidelity(teacher, pipe, steps=4, num_images=3, seed=1, value_range=[-1.0, 1.0],
                               scheduler_config=sched.config)
    assert tr["mse_mean"] == 0.0 and tr["mse_max"] == 0.0
    assert tr["psnr_mean_db"] == PSNR_CAP_DB and tr["num_capped"] == 3
    assert np.array_equal(tr["teacher_images"], tr["o2mkd_images"])
    assert type(pipe.scheduler).__name__ == "DDPMScheduler"  # DDIM only for the call, then restored


def test_agreement_zero_when_students_copy_teacher(copies, tiny_teacher_dir):
    teacher, sched, pipe = copies
    data = build_dataset(_cfg(tiny_teacher_dir).data)
    df = teacher_agreement(pipe.students, TeacherFn(teacher, feature_blocks=None), sched, data,
                             num_samples=40, num_buckets=4, seed=0, batch_size=16)
    assert list(df.columns[:4]) == ["t_lo", "t_hi", "segment", "n"] and "mse" in df
    assert df["n"].sum() == 40 and (df["t_lo"] < df["t_hi"]).all()
    # buckets [0,250) [250,500) [500,750) [750,1000) cut by segments [0,333) [333,667) [667,1000): 6 rows
    assert len(df) == 6 and df["segment"].tolist() == [0, 0, 1, 1, 2, 2]
    assert df["mse"].max() < 1e-10 and (df["teacher_task_mse"] > 0).all()
    seg = segment_summary(df)
    assert seg["segment"].tolist() == [0, 1, 2] and seg["n"].sum() == 40
    assert seg[["t_lo", "t_hi"]].values.tolist() == [[0, 333], [333, 667], [667, 1000]]


def test_bad_out_raises_config_error(tmp_path, run_dir):
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a finished o2mkd-ray run folder"):
        evaluate_run(tmp_path / "empty")
    with pytest.raises(ConfigError, match="--steps"):
        evaluate_run(run_dir, steps=0)


def test_cli_hooks(run_dir, capsys):
    p = argparse.ArgumentParser(prog="o2mkd-ray")
    add_eval_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["eval", str(run_dir), "--num-images", "2", "--steps", "2"])
    assert (args.cmd, args.num_images, args.steps) == ("eval", 2, 2)
    assert run_eval_cli(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["fid_backend"] == "random-conv" and len(printed["files"]) == 5
    assert json.loads((run_dir / "eval" / "report.json").read_text())["settings"]["steps"] == 2
