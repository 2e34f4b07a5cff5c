"""Tune and analyze on text-to-image teachers: the objectives read the run's captions (agreement on the cached
latents with their text conditioning, fidelity through the text-to-image eval), the cost counts the conditional
forward at the teacher's text length, analyze measures the teacher under its captions, and a real 2-trial Tune
search on a tiny Stable Diffusion teacher gives a ``best.yaml`` that distill accepts.

Every test takes the teacher kind as a parameter: a further text-to-image kind is one more line in ``TEACHERS``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT, sd_overrides

from o2mkd_ray.core.fixtures import make_tiny_sd, make_tiny_sdxl

T = 1000
# kind -> the tiny teacher folder's maker (a text length of 16, not SD's 77, so that a cost counted at the wrong
# text length shows)
TEACHERS = {
    "sd": functools.partial(make_tiny_sd, max_length=16),
    "sd-v": functools.partial(make_tiny_sd, max_length=16, prediction_type="v_prediction"),
    "sdxl": functools.partial(make_tiny_sdxl, max_length=16),
}
TUNED = ["sdxl"]  # the kind that also goes through a whole Tune search (the slow test): SDXL's dict condition
# is a superset of SD's tensor one in every path a trial takes (captions, teacher service, objectives, cost)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """``teacher_dir(kind)``: the kind's tiny teacher folder, built once per module."""
    made = {}

    def get(kind: str):
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp(kind) / "teacher"
            TEACHERS[kind](made[kind])
        return made[kind]

    return get


def _cfg(folder, prompts, *extra):
    from o2mkd_ray.config.loading import load_config

    return load_config(ROOT / "pipelines" / "tiny.yaml", [*sd_overrides(folder, prompts), *extra])


def _built_run(cfg, out):
    """A run folder (``config.json``, ``pipeline/``) whose students are built from the teacher (teacher-slice
    init); the caption cache is left for the objective to build."""
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.pipelines.build import build_sd_pipeline, teacher_sd_pipeline

    teacher, sched = load_teacher(cfg.teacher)
    students = build_students(cfg, teacher, cfg.segments.n)
    build_sd_pipeline(students, cfg.segments.boundaries, teacher_sd_pipeline(cfg, teacher),
                      cfg.sampling.scheduler).save_pretrained(out / "pipeline")
    (out / "config.json").write_text(cfg.to_json())
    return teacher, sched


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_objectives_and_cost_read_the_captions(kind, teacher_dir, prompts_file, tmp_path):
    """Students equal to the teacher agree with it exactly under the same captions (both objectives 0); half-width
    students do not; the cost is report.json's, counted on the conditional forward at the tokenizer's length."""
    from o2mkd_ray.core.costs import forward_cost, sampler_timesteps
    from o2mkd_ray.core.costs import sampling_cost as run_cost
    from o2mkd_ray.core.sd import text_length
    from o2mkd_ray.core.teacher import sample_shape
    from o2mkd_ray.tune.trial import objective_value, sampling_cost

    folder = teacher_dir(kind)
    assert text_length(str(folder)) == 16
    for widths, exact in (([1.0, 1.0], True), ([0.5, 1.0], False)):
        cfg = _cfg(folder, prompts_file, "segments.boundaries=[0,400,1000]", f"students.width={widths}",
                   "students.layers_per_block=null", "students.drop_mid_block=false")
        out = tmp_path / str(widths)
        teacher, sched = _built_run(cfg, out)
        agree = objective_value(cfg, out, "agreement", teacher, sched, samples=16)
        assert len(list((out / "cache").glob("cond-*.safetensors"))) == 1  # the run's caption data
        fid = objective_value(cfg, out, "fidelity", teacher, sched, images=2, steps=2)
        assert (out / "eval" / "metrics.json").is_file()  # the text-to-image eval made the images
        shape = sample_shape(teacher, 4, 8)
        cost = sampling_cost(cfg, teacher, shape, sched.config)
        t_macs = forward_cost(teacher, shape, seq_len=16)["macs"]
        assert cost["teacher_macs"] == t_macs != forward_cost(teacher, shape, seq_len=77)["macs"]
        steps = sampler_timesteps(cfg.sampling.scheduler, sched.config, cfg.sampling.steps)
        assert cost["cost"] == run_cost(cost["macs"], t_macs, [0, 400, T], steps)["macs_ratio"]
        assert all(math.isfinite(v) for v in (agree["quality"], fid["quality"], cost["cost"]))
        if exact:
            assert agree["quality"] < 1e-10 and fid["quality"] < 1e-10 and cost["cost"] == 1.0
        else:
            assert agree["quality"] > 1e-6 and fid["quality"] > 0 and cost["cost"] < 1.0


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_analyze_measures_the_teacher_under_its_captions(kind, teacher_dir, prompts_file, tmp_path):
    """``o2mkd-ray analyze`` proposes ordered boundaries inside (0, T); its statistics are those of the caption
    latents with their own captions (not the empty prompt), cached as a run folder caches them."""
    import torch

    from o2mkd_ray.cli.main import main
    from o2mkd_ray.core.conditioning import COND_NAMES, as_dict
    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.distill.run_folder import run_dataset
    from o2mkd_ray.tune.analysis import (
        feature_stats,
        propose_boundaries,
        teacher_feature_stats,
        timestep_grid,
    )

    folder = teacher_dir(kind)
    sets = [a for o in sd_overrides(folder, prompts_file) for a in ("--set", o)]
    assert main(["analyze", str(ROOT / "pipelines" / "tiny.yaml"), "--n", "3", "--images", "4",
                 "--timesteps", "8", "--out", str(tmp_path), *sets]) == 0
    b = yaml.safe_load((tmp_path / "analysis" / "boundaries.yaml").read_text())["segments"]["boundaries"]
    assert len(b) == 4 and b[0] == 0 and b[-1] == T and all(0 < x < T for x in b[1:-1])
    assert all(x < y for x, y in itertools.pairwise(b)), b
    assert (tmp_path / "analysis" / "feature_boxplot.png").stat().st_size > 5000
    assert len(list((tmp_path / "cache").glob("cond-*.safetensors"))) == 1

    cfg = _cfg(folder, prompts_file)
    stats = feature_stats(cfg, num_images=4, num_timesteps=8, out=tmp_path)  # the cached captions again
    assert propose_boundaries(cfg, 3, stats=stats) == b
    teacher, sched = load_teacher(cfg.teacher)
    data, uncond = run_dataset(cfg, tmp_path, teacher, sched)
    captions = teacher_feature_stats(teacher, sched, data, timestep_grid(T, 8), 4)
    pd.testing.assert_frame_equal(stats, captions, check_like=True)
    u = as_dict(uncond)  # SD: text embeddings; SDXL: also pooled embeddings and time ids
    empty = [(item[0], *[u[n][0] for n in COND_NAMES if n in u]) for item in data]
    assert not np.allclose(captions["mean"], teacher_feature_stats(teacher, sched, empty, timestep_grid(T, 8),
                                                                   4)["mean"])
    assert not torch.equal(data[0][1], u["encoder_hidden_states"][0])


@pytest.mark.parametrize("kind", list(TEACHERS))
def test_tune_preflight_checks_text_to_image_inputs_before_ray(kind, teacher_dir, prompts_file, tmp_path):
    """The search's pre-flight runs the text-to-image checks (prompts file, complete model folder) once, before
    any Ray work or output folder."""
    import shutil

    from o2mkd_ray.errors import ConfigError
    from o2mkd_ray.tune.search import run_tuning

    space = {"segments.n": {"choice": [2]}, "students.width": {"per_segment_choice": [0.5]}}
    with pytest.raises(ConfigError, match="data.path: prompts file .*missing.txt' does not exist"):
        run_tuning(_cfg(teacher_dir(kind), tmp_path / "missing.txt"), space, tmp_path / "a")
    broken = tmp_path / "broken"
    shutil.copytree(teacher_dir(kind), broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ConfigError, match=r"not a complete Stable Diffusion (XL )?folder \(missing vae/\)"):
        run_tuning(_cfg(broken, prompts_file), space, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("kind", TUNED)
def test_two_trial_tune_on_a_text_to_image_teacher(kind, ray_local, teacher_dir, prompts_file, tmp_path):
    """A real Tune search seeded from the analysis: both trials distil the text-to-image teacher through the
    engine, report finite fidelity and a cost equal to their report.json's, and best.yaml passes distill's
    pre-flight."""
    from o2mkd_ray.cli.main import main
    from o2mkd_ray.config.loading import from_dict, load_config
    from o2mkd_ray.core.teacher import load_teacher, sample_shape
    from o2mkd_ray.tune.analysis import feature_stats, propose_boundaries
    from o2mkd_ray.tune.resolve import apply_budget, resolve_trial_config
    from o2mkd_ray.tune.search import run_tuning
    from o2mkd_ray.tune.space import load_space
    from o2mkd_ray.tune.trial import sampling_cost

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "segments.n": {"choice": [1, 2]},
        "segments.boundaries": {"ordered_cuts": {"low": 0.1, "high": 0.9, "min_gap": 0.05}},
        "students.width": {"per_segment_choice": [0.5, 1.0]},
        "budget": {"train.steps": 4, "train.checkpoint_every": 2, "ray.cpus_per_worker": 0.2,
                   "teacher.num_cpus": 0.1},
        "search": {"algorithm": "random", "scheduler": "none", "objective": "fidelity", "num_samples": 2,
                   "max_concurrent": 2, "eval_images": 2, "eval_steps": 2, "seed": 3, "analysis_images": 4,
                   "analysis_timesteps": 8},
    }))
    cfg = _cfg(teacher_dir(kind), prompts_file)
    out = tmp_path / "out"
    df = run_tuning(cfg, space, out, seed_from_analysis=True)
    # the first trials: the analysis proposal for n=2 (from the captions cached in OUT/tune/cache), uniform n=1
    seeded = json.loads((out / "tune" / "tune.json").read_text())["points_to_evaluate"]
    assert len(list((out / "tune" / "cache").glob("cond-*.safetensors"))) == 1
    sp = load_space(space)
    got = [resolve_trial_config(apply_budget(cfg, sp.budget), {**sp.constants(), **p}, T).segments.boundaries
           for p in seeded]
    cut = propose_boundaries(cfg, 2, stats=feature_stats(cfg, 4, 8, out=out / "tune"))[1]
    assert got == [[0, min(max(cut, 100), 900), T], [0, T]]  # the proposal, moved into [low, high]·T if outside

    res = pd.read_csv(out / "tune" / "results.csv")
    assert len(res) == len(df) == 2 and set(res["status"]) == {"TERMINATED"}, res.to_dict("records")
    assert sorted(res["n"]) == [1, 2]
    teacher, sched = load_teacher(cfg.teacher)
    for r in res.itertuples():
        assert math.isfinite(r.quality) and r.quality >= 0 and 0 < r.cost <= 1.0
        trial = out / "tune" / "trials" / r.trial_id
        report = json.loads((trial / "report.json").read_text())
        tcfg = from_dict(json.loads((trial / "config.json").read_text()))
        est = sampling_cost(tcfg, teacher, sample_shape(teacher, 4, 8), sched.config)["cost"]
        assert r.cost == report["macs_ratio_per_step"] == pytest.approx(est, rel=1e-12)  # conditional forward
        assert json.loads((trial / "eval" / "metrics.json").read_text())["metrics"]["pixel_mse"] == \
            pytest.approx(r.quality)  # fidelity: the text-to-image eval's pixel MSE
        prog = pd.read_csv(next((out / "tune" / "ray" / "tune").glob(f"{r.trial_id}*/progress.csv")))
        assert prog["step"].tolist() == [2, 4] and prog["cost"].iloc[0] == pytest.approx(r.cost, rel=1e-12)

    best = out / "tune" / "best.yaml"
    loaded = load_config(best)
    assert loaded.teacher.pretrained == cfg.teacher.pretrained and loaded.data.kind == "prompts"
    assert loaded.segments.boundaries == json.loads(res[res["best"]].iloc[0]["boundaries"])
    assert loaded.train.steps == cfg.train.steps  # the full budget
    assert main(["distill", str(best), "--dry-run", "--out", str(tmp_path / "d")]) == 0
