"""Tune over boundaries and widths: space translation (property tests), bad spaces, one real 2-trial Tune run."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

T = 1000
SPACE = {
    "segments.n": {"choice": [1, 2, 3, 4, 6]},
    "segments.boundaries": {"ordered_cuts": {"low": 0.05, "high": 0.95, "min_gap": 0.02}},
    "students.width": {"per_segment_choice": [0.25, 0.5, 0.75]},
    "kd.lambda_feat": {"loguniform": [0.1, 10]},
    "budget": {"train.steps": 10},
}


def _base(tiny_overrides, *extra) -> dict:
    from o2mkd_ray.config.loading import load_config

    return load_config(ROOT / "pipelines" / "tiny.yaml", [*tiny_overrides, *extra]).to_dict()


def _assert_valid(b, n, T=T):
    assert len(b) == n + 1 and b[0] == 0 and b[-1] == T, b
    assert all(x < y for x, y in zip(b, b[1:])), b


# ----------------------------------------------------------------------------------------------------------------
# space translation


def test_any_sample_resolves_to_a_valid_config(tiny_overrides):
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.tune.resolve import apply_budget, resolve_trial_config
    from o2mkd_ray.tune.space import parse_space, sample_point

    sp = parse_space(SPACE)
    base = apply_budget(_base(tiny_overrides), sp.budget)
    ps = sp.param_space(3)
    assert sum(k.startswith("segments.boundaries[") for k in ps) == 6  # weights for the largest n
    assert sum(k.startswith("students.width[") for k in ps) == 6
    seen_n = set()
    for seed in range(300):
        point = sample_point(ps, np.random.default_rng(seed))
        cfg = resolve_trial_config(base, point, T)  # validates, else raises
        n = point["segments.n"]
        seen_n.add(n)
        b = cfg.segments.boundaries
        _assert_valid(b, n)
        assert cfg.segments.n == n and cfg.segments.fractions is None
        assert Segments.from_config(cfg.segments, T).boundaries == tuple(b)
        cuts = b[1:-1]
        assert all(50 <= c <= 950 for c in cuts), b  # inside [low, high]·T
        assert min(np.diff(b)) >= 20  # min_gap·T
        assert cfg.students.width == [point[f"students.width[{i}]"] for i in range(n)]
        assert 0.1 <= cfg.kd.lambda_feat <= 10 and cfg.train.steps == 10
    assert seen_n == {1, 2, 3, 4, 6}


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 8), T=st.integers(8, 2000), low=st.floats(0, 0.5), span=st.floats(0.05, 1.0),
       min_gap=st.floats(0, 0.2), data=st.data())
def test_cuts_from_weights_always_valid_and_invertible(n, T, low, span, min_gap, data):
    from o2mkd_ray.errors import ConfigError
    from o2mkd_ray.tune.cuts import cut_room, cuts_from_weights, weights_from_boundaries

    high = min(1.0, low + span)
    weights = data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    if n > 1 and cut_room(n, T, low, high, min_gap)[2] < 0:
        with pytest.raises(ConfigError, match="do not fit"):
            cuts_from_weights(weights, n, T, low, high, min_gap)
        return
    b = cuts_from_weights(weights, n, T, low, high, min_gap)
    _assert_valid(b, n, T)
    g = max(1, int(np.ceil(min_gap * T - 1e-9)))
    assert min(np.diff(b)) >= g
    if n > 1:
        assert b[1] >= low * T - 1e-6 and b[-2] <= high * T + 1e-6
    w = weights_from_boundaries(b, T, n + 2, low, high, min_gap)
    assert len(w) == n + 2 and all(0 <= x <= 1 + 1e-12 for x in w)
    assert cuts_from_weights(w, n, T, low, high, min_gap) == b  # a point of the space gives these boundaries back


def test_explicit_values_and_uniform_defaults(tiny_overrides):
    from o2mkd_ray.tune.resolve import resolve_trial_config

    base = _base(tiny_overrides)
    cfg = resolve_trial_config(base, {"segments.boundaries": [0, 100, 1000], "students.width": [0.5, 1.0]}, T)
    assert cfg.segments.boundaries == [0, 100, 1000] and cfg.segments.n == 2 and cfg.students.width == [0.5, 1.0]
    cfg = resolve_trial_config(base, {"segments.n": 4}, T)  # n alone: equal segments, made explicit
    assert cfg.segments.boundaries == [0, 250, 500, 750, 1000]
    assert resolve_trial_config(base, {}, T).segments.boundaries == [0, 333, 667, 1000]


def test_shipped_spaces_parse_and_resolve(tiny_overrides):
    from o2mkd_ray.tune.resolve import apply_budget
    from o2mkd_ray.tune.space import check_space, load_space

    for name in ("boundaries_widths.yaml", "kd_weights.yaml"):
        sp = load_space(ROOT / "tune_spaces" / name)
        base = _base(tiny_overrides)
        check_space(sp, apply_budget(base, sp.budget), T, samples=64)
        check_space(sp, base, T, samples=64)
        assert sp.search["objective"] == "agreement" and sp.budget["train.steps"] == 200
    sp = load_space(ROOT / "tune_spaces" / "transformer_tiny.yaml")  # its samples resolve on any teacher's T
    base = _base(tiny_overrides)
    check_space(sp, apply_budget(base, sp.budget), T, samples=64)
    assert sp.search["objective"] == "fidelity" and sp.n_values(3) == [2]
    sp = load_space(ROOT / "tune_spaces" / "boundaries_widths.yaml")
    assert sp.n_values(3) == [2, 3, 4] and sp.cuts == {"low": 0.05, "high": 0.95, "min_gap": 0.05}


@pytest.mark.parametrize("space, match", [
    ({"segments.nn": {"choice": [2]}}, "unknown config key 'segments.nn'; did you mean 'segments.n'"),
    ({"students.widht": {"choice": [0.5]}}, "did you mean 'students.width'"),
    ({"students.width": {"choise": [0.5]}}, "unknown distribution 'choise'; did you mean 'choice'"),
    ({"students.width": {"normal": [0, 1]}}, "unknown distribution 'normal'"),
    ({"kd.lambda_feat": {"loguniform": [0, 1]}}, "loguniform needs low > 0"),
    ({"kd.lambda_feat": {"uniform": [2, 1]}}, "low < high"),
    ({"kd.lambda_feat": {"uniform": 3}}, r"takes \[low, high\]"),
    ({"kd.lambda_feat": 0.5}, "expected one distribution"),
    ({"segments.n": {"uniform": [1, 4]}}, "segments.n: needs choice, grid or randint"),
    ({"segments.n": {"choice": [0, 2]}}, "segments.n: needs"),
    ({"kd.lambda_feat": {"per_segment_choice": [1]}}, "per-segment keys"),
    ({"students.width": {"ordered_cuts": {}}}, "ordered_cuts works on segments.boundaries only"),
    ({"segments.boundaries": {"ordered_cuts": {"low": 0.9, "high": 0.1}}}, "0 <= low < high <= 1"),
    ({"segments.boundaries": {"ordered_cuts": {"lo": 0.1}}}, "ordered_cuts takes a mapping"),
    ({"segments.boundaries": {"uniform": [0, 1]}}, "use {ordered_cuts"),
    ({"segments.fractions": {"choice": [[0.5]]}}, "ordered_cuts instead"),
    ({"segments.n": {"choice": [2]}, "search": {"algorith": "grid"}}, "unknown setting 'algorith'; did you mean"),
    ({"segments.n": {"choice": [2]}, "search": {"algorithm": "bayes"}}, "search.algorithm: must be one of"),
    ({"segments.n": {"choice": [2]}, "search": {"objective": "fid"}}, "search.objective"),
    ({"segments.n": {"choice": [2]}, "search": {"num_samples": 0}}, "num_samples"),
    ({"segments.n": {"choice": [2]}, "search": {"analysis_timesteps": 0}}, "search.analysis_timesteps: must be"),
    ({"segments.n": {"choice": [2]}, "budget": {"train.stepz": 3}}, "budget: unknown config key 'train.stepz'; "
                                                                    "did you mean 'train.steps'"),
    ({"segments.n": {"grid": [2, 3]}, "search": {"algorithm": "optuna"}}, "cannot take grid"),
    ({"budget": {"train.steps": 3}}, "no tuned keys"),
])
def test_bad_spaces_raise_config_error(space, match):
    from o2mkd_ray.errors import ConfigError
    from o2mkd_ray.tune.space import parse_space

    with pytest.raises(ConfigError, match=match):
        parse_space(space)


def test_bad_space_files_and_infeasible_samples(tiny_overrides, tmp_path):
    from o2mkd_ray.errors import ConfigError
    from o2mkd_ray.tune.resolve import apply_budget
    from o2mkd_ray.tune.space import check_space, load_space, parse_space

    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("segments.n: {choice: [2, 3]\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_space(tmp_path / "bad.yaml")
    base = _base(tiny_overrides)
    with pytest.raises(ConfigError, match="do not fit"):  # 39 cuts 50 timesteps apart in [0.4, 0.6]·T
        check_space(parse_space({"segments.n": {"choice": [2, 40]}, "segments.boundaries": {
            "ordered_cuts": {"low": 0.4, "high": 0.6, "min_gap": 0.05}}}), base, T)
    with pytest.raises(ConfigError, match="students.width"):  # widths the config rejects
        check_space(parse_space({"students.width": {"per_segment_choice": [0.5, 5.0]}}), base, T)
    with pytest.raises(ConfigError, match="students.width: got 3 widths for 2 segments"):
        check_space(parse_space({"segments.n": {"choice": [2]}}), {**base, "students": {"width": [0.5] * 3}}, T)
    with pytest.raises(ConfigError, match="budget: train.steps"):
        apply_budget(base, {"train.steps": -1})


def test_unbuildable_student_widths_fail_before_ray(tiny_overrides):
    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.errors import ConfigError
    from o2mkd_ray.tune.space import check_students, parse_space

    base = _base(tiny_overrides)
    teacher, _ = load_teacher(from_dict(base).teacher)
    check_students(parse_space({"students.width": {"per_segment_choice": [0.5, 1.0]}}), teacher, base)
    with pytest.raises(ConfigError, match="0 channels"):  # 4 channels x 0.1 rounds to 0
        check_students(parse_space({"students.width": {"per_segment_choice": [0.5, 0.1]}}), teacher, base)


def test_max_concurrent_trials_from_cluster_resources(tiny_overrides):
    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.tune.search import max_concurrent_trials

    cfg = from_dict(_base(tiny_overrides))  # 0.25 CPU per worker, teacher 0.25 CPU, + 0.01 per trial
    assert max_concurrent_trials(cfg, 3, {"CPU": 2.0}) == 1  # 1.01 per trial
    assert max_concurrent_trials(cfg, 3, {"CPU": 16.0}) == 15
    assert max_concurrent_trials(cfg, 1, {"CPU": 2.0}) == 3  # 0.51 per trial
    assert max_concurrent_trials(cfg, 3, {"CPU": 0.5}) == 1  # at least one
    cfg.ray.gpus_per_worker, cfg.teacher.num_gpus = 0.5, 0.5
    assert max_concurrent_trials(cfg, 3, {"CPU": 64.0, "GPU": 4.0}) == 2  # GPU-bound: 2 per trial


def test_progress_aggregates_only_complete_steps():
    from o2mkd_ray.tune.trial import TrialProgress

    got = []
    p = TrialProgress(2, 30, {"cost": 0.5}, got.append)
    p(0, {"step": 10, "val_loss": 1.0, "loss_avg": 2.0, "samples_per_s": 5})
    assert got == []  # segment 1 has not reached step 10 yet
    p(0, {"step": 20, "val_loss": 0.5, "loss_avg": 1.0, "samples_per_s": 5})
    p(1, {"step": 10, "val_loss": 3.0, "loss_avg": 4.0, "samples_per_s": 7})
    p(1, {"step": 20, "val_loss": 1.5, "loss_avg": 1.0, "samples_per_s": 7})
    p(0, {"step": 30, "val_loss": 0.1, "loss_avg": 1.0, "samples_per_s": 5})
    p(1, {"step": 30, "val_loss": 0.1, "loss_avg": 1.0, "samples_per_s": 5})  # the final step: left to the trial
    assert [(r["step"], r["quality"], r["samples_per_s"]) for r in got] == [(10, 2.0, 12.0), (20, 1.0, 12.0)]
    assert all(r["cost"] == 0.5 and r["val_loss"] == r["quality"] and not r["final"] for r in got)


def test_progress_with_per_segment_budgets_reports_up_to_the_largest():
    """train.steps = [30, 10]: segment 1 stops at 10 and stands at every later step with its final report."""
    from o2mkd_ray.tune.trial import TrialProgress

    got = []
    p = TrialProgress(2, [30, 10], {}, got.append)
    p(0, {"step": 10, "val_loss": 1.0, "loss_avg": 1.0, "samples_per_s": 5})
    p(1, {"step": 10, "val_loss": 3.0, "loss_avg": 3.0, "samples_per_s": 7})  # segment 1's last report
    p(0, {"step": 20, "val_loss": 0.5, "loss_avg": 0.5, "samples_per_s": 5})
    p(0, {"step": 30, "val_loss": 0.1, "loss_avg": 0.1, "samples_per_s": 5})  # the final step: left to the trial
    assert [(r["step"], r["quality"]) for r in got] == [(10, 2.0), (20, 1.75)]


def test_pareto_front_and_best_selection(tmp_path):
    from o2mkd_ray.tune.report import pareto_front, plot_pareto

    df = pd.DataFrame({"trial_id": ["a_0", "b_1", "c_2", "d_3", "e_4"], "n": [2, 3, 3, 4, 2],
                       "status": ["TERMINATED", "TERMINATED", "TERMINATED", "STOPPED", "TERMINATED"],
                       "quality": [1.0, 0.5, 0.6, 0.1, 2.0], "cost": [0.2, 0.5, 0.6, 0.1, 0.1]})
    df["pareto"] = pareto_front(df)
    # c is beaten by b on both; d is not finished; e is cheapest
    assert df["pareto"].tolist() == [True, True, False, False, True]
    plot_pareto(df, tmp_path / "p.png", "agreement", max_cost=0.4, best="a_0")
    assert (tmp_path / "p.png").stat().st_size > 5000


def test_seed_points_express_the_analysis_proposal(tiny_overrides):
    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.tune.analysis import feature_stats, propose_boundaries
    from o2mkd_ray.tune.resolve import resolve_trial_config
    from o2mkd_ray.tune.search import seed_points
    from o2mkd_ray.tune.space import parse_space

    sp = parse_space({"segments.n": {"choice": [2, 3]},
                      "segments.boundaries": {"ordered_cuts": {"low": 0.0, "high": 1.0, "min_gap": 0.001}},
                      "students.width": {"per_segment_choice": [0.5, 0.75]}})
    base = _base(tiny_overrides)
    cfg = from_dict(base)
    stats = feature_stats(cfg, num_images=4, num_timesteps=10)
    points = seed_points(sp, cfg, base, T, stats=stats)
    got = [resolve_trial_config(base, {**sp.constants(), **p}, T).segments.boundaries for p in points]
    expected = [propose_boundaries(cfg, n, stats=stats) for n in (2, 3)]
    expected += [list(Segments.uniform(T, n).boundaries) for n in (2, 3)]
    assert got == [b for i, b in enumerate(expected) if b not in expected[:i]]
    from o2mkd_ray.errors import ConfigError

    with pytest.raises(ConfigError, match="needs `segments.boundaries: {ordered_cuts"):
        seed_points(parse_space({"segments.n": {"choice": [2]}}), cfg, base, T, stats=stats)


def test_seed_points_are_complete_for_optuna_and_hyperopt(tiny_overrides):
    from ray.tune.search.sample import Categorical, Float, Integer

    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.tune.analysis import feature_stats
    from o2mkd_ray.tune.resolve import resolve_trial_config
    from o2mkd_ray.tune.search import seed_points
    from o2mkd_ray.tune.space import parse_space

    base = _base(tiny_overrides, "kd.lambda_feat=0.05", "students.width=0.5")
    cfg = from_dict(base)
    stats = feature_stats(cfg, num_images=2, num_timesteps=6)
    sp = parse_space({**SPACE, "students.layers_per_block": {"per_segment_randint": [1, 3]},
                      "search": {"algorithm": "optuna"}})
    ps = sp.param_space(3)
    points = seed_points(sp, cfg, base, T, stats=stats)
    assert len(points) >= 5  # proposals for n = 2, 3, 4, 6, then uniform splits
    for p in points:
        assert set(p) == set(ps) - {"segments.boundaries"}  # every sampled key, constants aside
        for k, dom in ps.items():
            if isinstance(dom, Categorical):
                assert p[k] in dom.categories
            elif isinstance(dom, (Float, Integer)):
                assert dom.lower <= p[k] <= dom.upper
        assert p["kd.lambda_feat"] == 0.1  # the base value 0.05, moved into the domain [0.1, 10]
        assert p["students.width[0]"] == 0.5  # the base width, a valid choice
        resolve_trial_config(base, {**sp.constants(), **p}, T)


def test_tune_cli_hooks_parse_and_fail_early(tiny_overrides, tmp_path):
    import argparse

    from o2mkd_ray.cli.tune import add_tune_parser, run_tune_cli
    from o2mkd_ray.errors import ConfigError

    p = argparse.ArgumentParser()
    add_tune_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["tune", str(ROOT / "pipelines" / "tiny.yaml"), str(tmp_path / "missing.yaml"),
                         "--num-samples", "3", "--out", str(tmp_path / "o"), "--max-cost", "0.5",
                         "--seed-from-analysis", "--no-resume", *[a for o in tiny_overrides for a in ("--set", o)]])
    assert (args.num_samples, args.max_cost, args.seed_from_analysis, args.no_resume) == (3, 0.5, True, True)
    with pytest.raises(ConfigError, match="space file .*missing.yaml' does not exist"):
        run_tune_cli(args)


def test_run_tuning_fails_early_on_bad_input(tiny_overrides, tmp_path):
    """Before any Ray work: an existing search with --no-resume, a missing optional package."""
    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.errors import ConfigError
    from o2mkd_ray.tune.search import run_tuning

    cfg = from_dict(_base(tiny_overrides))
    exp = tmp_path / "out" / "tune" / "ray" / "tune"
    exp.mkdir(parents=True)
    (exp / "tuner.pkl").write_bytes(b"")
    with pytest.raises(ConfigError, match="already holds a tune search"):
        run_tuning(cfg, {"segments.n": {"choice": [2]}}, tmp_path / "out", resume=False)
    per_node = from_dict(_base(tiny_overrides), ["teacher.replicas=per_node"])
    with pytest.raises(ConfigError, match="teacher.replicas: per_node is for distill on a cluster"):
        run_tuning(per_node, {"segments.n": {"choice": [2]}}, tmp_path / "out-per-node")
    for alg in ("optuna", "hyperopt"):
        if importlib.util.find_spec(alg) is None:
            with pytest.raises(ConfigError, match=f"search.algorithm={alg} needs `pip install {alg}`"):
                run_tuning(cfg, {"kd.lambda_feat": {"uniform": [0.1, 1]}, "search": {"algorithm": alg}},
                           tmp_path / f"out-{alg}")


class _Result:
    """The parts of a ray.tune.Result that the results table reads."""

    def __init__(self, path, config, metrics, error=None):
        self.path, self.config, self.metrics, self.error = str(path), config, metrics, error


def test_results_table_best_yaml_and_max_cost(tiny_overrides, tmp_path):
    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.errors import ConfigError
    from o2mkd_ray.tune.report import results_frame, write_outputs
    from o2mkd_ray.tune.resolve import apply_budget
    from o2mkd_ray.tune.space import parse_space, sample_point

    sp = parse_space({**SPACE, "segments.n": {"choice": [2, 3]}})
    base = _base(tiny_overrides)
    trial_base = apply_budget(base, sp.budget)
    teacher, _ = load_teacher(from_dict(base).teacher)
    ps = sp.param_space(3)
    cfgs = [sample_point(ps, np.random.default_rng(i)) for i in range(4)]
    grid = [_Result(tmp_path / "x_00000", cfgs[0], {"final": True, "quality": 0.5, "cost": 0.6, "step": 10}),
            _Result(tmp_path / "x_00001", cfgs[1], {"final": True, "quality": 0.3, "cost": 0.9, "step": 10}),
            _Result(tmp_path / "x_00002", cfgs[2], {"final": False, "quality": 9.0, "cost": 0.2, "step": 5}),
            _Result(tmp_path / "x_00003", cfgs[3], {}, error=RuntimeError("Traceback\nValueError: bad"))]
    tdir = tmp_path / "tune"
    tdir.mkdir()
    df = results_frame(grid, sp, trial_base, T, teacher, (1, 8, 8), tdir)
    assert df["status"].tolist() == ["TERMINATED", "TERMINATED", "STOPPED", "ERROR"]
    assert np.isnan(df["quality"][2]) and df["steps"].tolist() == [10, 10, 5, 0]
    assert df["error"][3] == "ValueError: bad" and 0 < df["cost"][3] <= 1  # cost of a failed trial: from its config
    assert df["pareto"].tolist() == [True, True, False, False]
    for r in df.itertuples():
        assert json.loads(r.boundaries)[-1] == T and len(json.loads(r.widths)) == r.n
        assert r.n == cfgs[r.Index]["segments.n"]
    assert df["kd.lambda_feat"].between(0.1, 10).all()  # the other tuned keys get their own columns

    assert write_outputs(df.copy(), sp, base, T, tdir, None, "tiny") == "x_00001"  # lowest quality
    best = yaml.safe_load((tdir / "best.yaml").read_text())
    assert best["name"] == "tiny-tuned" and best["train"]["steps"] == 20  # the full budget, not 10
    assert best["segments"]["boundaries"] == json.loads(df["boundaries"][1])
    assert best["students"]["width"] == json.loads(df["widths"][1])
    assert best["kd"]["lambda_feat"] == pytest.approx(df["kd.lambda_feat"][1])
    assert "best trial x_00001" in (tdir / "best.yaml").read_text().splitlines()[0]
    assert write_outputs(df.copy(), sp, base, T, tdir, 0.7, "tiny") == "x_00000"  # best under the cost cap
    assert pd.read_csv(tdir / "results.csv")["best"].tolist() == [True, False, False, False]
    (tdir / "best.yaml").unlink()
    with pytest.raises(ConfigError, match=r"no finished trial has cost <= 0.1 \(lowest: 0.6\); raise --max-cost"):
        write_outputs(df.copy(), sp, base, T, tdir, 0.1, "tiny")
    assert (tdir / "results.csv").is_file() and (tdir / "pareto.png").is_file() and not (tdir / "best.yaml").exists()
    with pytest.raises(ConfigError, match="no trial finished"):
        write_outputs(df.iloc[2:].copy(), sp, base, T, tdir, None, "tiny")


def test_objective_and_cost_on_a_built_pipeline(tiny_overrides, tmp_path):
    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.core.costs import costs
    from o2mkd_ray.core.schedulers import make_scheduler
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.pipelines.build import build_pipeline
    from o2mkd_ray.tune.trial import objective_value, sampling_cost

    for widths, exact in (([1.0, 1.0], True), ([0.5, 1.0], False)):
        cfg = from_dict({**_base(tiny_overrides), "segments": {"boundaries": [0, 400, T]},
                         "students": {"width": widths}})
        teacher, sched = load_teacher(cfg.teacher)
        students = build_students(cfg, teacher, 2)  # teacher-slice init: width 1 students are exact copies
        out = tmp_path / str(widths)
        build_pipeline(students, [0, 400, T], make_scheduler("ddim", sched.config), cfg.data.value_range) \
            .save_pretrained(out / "pipeline")
        agree = objective_value(cfg, out, "agreement", teacher, sched, samples=32)
        fid = objective_value(cfg, out, "fidelity", teacher, sched, images=2, steps=3)
        assert agree["quality"] == agree["agreement_mse"] and fid["quality"] == fid["fidelity_mse"]
        cost = sampling_cost(cfg, teacher, (1, 8, 8))
        assert sampling_cost(cfg, teacher, (1, 8, 8), sched.config) == cost  # the trial's path: no teacher reload
        real = [costs(s, (1, 8, 8))["macs"] for s in students]  # what report.json counts, on real weights
        assert cost["macs"] == real and cost["teacher_macs"] == costs(teacher, (1, 8, 8))["macs"]
        assert cost["steps_per_student"] == [2, 2]  # tiny: DDIM 4 steps 750, 500 -> student 1; 250, 0 -> student 0
        assert cost["cost"] == pytest.approx((2 * real[0] + 2 * real[1]) / (4 * cost["teacher_macs"]))
        if exact:
            assert agree["quality"] < 1e-10 and fid["quality"] < 1e-10 and cost["cost"] == 1.0
        else:
            assert agree["quality"] > 1e-6 and fid["quality"] > 0 and cost["cost"] < 1.0


# ----------------------------------------------------------------------------------------------------------------
# one real Tune run


def _ray_address() -> str:
    """This test's Ray cluster, for the state API (which otherwise looks for one and fails when other local
    clusters run beside it)."""
    import ray

    return ray.get_runtime_context().gcs_address


@pytest.mark.ray
@pytest.mark.slow
def test_two_trial_tune_run_writes_results_pareto_and_runnable_best(ray_local, tiny_overrides, tmp_path):
    import mlflow

    from o2mkd_ray.cli.main import main
    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.errors import ConfigError
    from o2mkd_ray.tune.analysis import propose_boundaries
    from o2mkd_ray.tune.resolve import apply_budget, resolve_trial_config
    from o2mkd_ray.tune.search import run_tuning
    from o2mkd_ray.tune.space import load_space

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "segments.n": {"choice": [1, 2]},
        "segments.boundaries": {"ordered_cuts": {"low": 0.1, "high": 0.9, "min_gap": 0.05}},
        "students.width": {"per_segment_choice": [0.5, 1.0]},
        # trials: 10 steps, a report at 5; fractional CPUs so that both trials fit on 2 CPUs at once
        "budget": {"train.steps": 10, "train.checkpoint_every": 5, "ray.cpus_per_worker": 0.2,
                   "teacher.num_cpus": 0.1},
        "search": {"algorithm": "random", "scheduler": "asha", "num_samples": 2, "grace_period": 5,
                   "eval_samples": 64, "seed": 3},
    }))
    db = tmp_path / "mlflow.db"
    cfg = load_config(ROOT / "pipelines" / "tiny.yaml",
                      [*tiny_overrides, "mlflow.enabled=true", f"mlflow.tracking_uri=sqlite:///{db}"])
    out = tmp_path / "out"
    # the first trials are the analysis proposal (n=2), then the uniform split (n=1)
    df = run_tuning(cfg, space, out, seed_from_analysis=True)
    seeded = json.loads((out / "tune" / "tune.json").read_text())["points_to_evaluate"]
    sp = load_space(space)
    base = apply_budget(cfg, sp.budget)
    expected = [resolve_trial_config(base, {**sp.constants(), **p}, T).segments.boundaries for p in seeded]
    cut = propose_boundaries(cfg, 2)[1]
    assert expected[0] == [0, min(max(cut, 100), 900), T]  # the proposal, moved into [low, high]·T if outside
    assert expected[1] == [0, T]

    res = pd.read_csv(out / "tune" / "results.csv")
    assert len(res) == 2 and len(df) == 2
    assert [json.loads(b) for b in res["boundaries"]] == expected[:2]
    for col in ("trial_id", "n", "boundaries", "widths", "quality", "cost", "status", "steps", "pareto", "best"):
        assert col in res.columns, col
    assert set(res["status"]) <= {"TERMINATED", "STOPPED"}, res[["status", "error"]].to_dict("records")
    fin = res[res["status"] == "TERMINATED"]
    assert len(fin) >= 1  # ASHA may stop the worse one at step 5, never both
    for r in res.itertuples():
        b, w = json.loads(r.boundaries), json.loads(r.widths)
        assert len(b) == r.n + 1 and b[0] == 0 and b[-1] == T and all(x < y for x, y in zip(b, b[1:]))
        assert len(w) == r.n and set(w) <= {0.5, 1.0}
        assert 0 < r.cost <= 1.0 + 1e-9  # students are at most as wide as the teacher
        assert (r.cost == 1.0) == (set(w) == {1.0})
        assert (out / "tune" / "trials" / r.trial_id / "config.json").is_file()
    assert np.isfinite(fin["quality"]).all() and (fin["quality"] > 0).all() and (fin["steps"] == 10).all()
    # intermediate reports reached Tune (the scheduler's input) before the final one
    for tid in fin["trial_id"]:
        prog = pd.read_csv(next((out / "tune" / "ray" / "tune").glob(f"{tid}*/progress.csv")))
        assert prog["step"].tolist() == [5, 10] and prog["final"].tolist() == [False, True]
    assert (out / "tune" / "pareto.png").stat().st_size > 5000
    assert res["pareto"].any() and res["best"].sum() == 1

    best_row = res[res["best"]].iloc[0]
    best = yaml.safe_load((out / "tune" / "best.yaml").read_text())
    assert best["segments"]["boundaries"] == json.loads(best_row["boundaries"])
    w = best["students"]["width"]
    assert (w if isinstance(w, list) else [w] * best_row["n"]) == json.loads(best_row["widths"])
    # the full budget, not the trials' reduced one
    assert best["train"]["steps"] == 20 and best["train"]["checkpoint_every"] == 10
    assert best["ray"]["cpus_per_worker"] == 0.25
    assert main(["distill", str(out / "tune" / "best.yaml"), "--dry-run", "--out", str(tmp_path / "d")]) == 0

    # MLflow: the trials are runs nested under one tune run, and none is left RUNNING (ASHA-stopped included)
    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
    parents = [r for r in runs if r.data.tags.get("o2mkd.kind") == "tune"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["o2mkd.trial_id"] for r in trials) == sorted(res["trial_id"])
    assert all(r.info.status != "RUNNING" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    for r in trials:
        if r.data.tags["o2mkd.trial_id"] in set(fin["trial_id"]):
            assert r.info.status == "FINISHED" and "agreement_mse" in r.data.metrics

    # the same command again restores the finished search (Tuner.restore): no new trial, the same table
    again = run_tuning(cfg, space, out)
    assert again["trial_id"].tolist() == res["trial_id"].tolist()
    assert again["status"].tolist() == res["status"].tolist()
    assert len(list((out / "tune" / "trials").iterdir())) == 2
    with pytest.raises(ConfigError, match="already holds a tune search"):
        run_tuning(cfg, space, out, resume=False)


@pytest.mark.slow
def test_asha_stopped_trials_release_all_cluster_resources(ray_local, tiny_overrides, tmp_path):
    """A trial ASHA stops aborts its segments' trainers before Tune frees its placement group: afterwards all
    CPUs are free, no placement group is left and no Train controller or teacher actor is alive (a killed
    controller used to leak its worker group's placement group, starving later trials)."""
    import time

    import ray
    from ray.util.state import list_actors, list_placement_groups

    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.tune.search import run_tuning

    space = {
        "segments.n": {"choice": [1, 2]},
        "students.width": {"per_segment_choice": [0.5, 1.0]},
        # many reports (every 5 of 60 steps): a stopped trial's trainers are still running when Tune stops it
        "budget": {"train.steps": 60, "train.checkpoint_every": 5, "ray.cpus_per_worker": 0.2,
                   "teacher.num_cpus": 0.1},
        "search": {"algorithm": "random", "scheduler": "asha", "num_samples": 3, "grace_period": 5,
                   "reduction_factor": 4, "max_concurrent": 2, "eval_samples": 16, "seed": 0},
    }
    cfg = load_config(ROOT / "pipelines" / "tiny.yaml", [*tiny_overrides, "mlflow.enabled=false"])
    out = tmp_path / "out"
    df = run_tuning(cfg, space, out)
    print(df[["trial_id", "n", "widths", "status", "steps"]].to_string())
    assert set(df["status"]) <= {"TERMINATED", "STOPPED"}, df.to_dict("records")
    stopped = df[df["status"] == "STOPPED"]
    assert len(stopped) >= 1, df[["trial_id", "status", "steps"]].to_dict("records")
    # the stopped trials' cleanup aborted their still-running trainers, each within the time limit
    files = [out / "tune" / "trials" / tid / "stopped_trainers.json" for tid in stopped["trial_id"]]
    counts = [json.loads(f.read_text()) for f in files if f.is_file()]
    assert sum(c["aborted"] for c in counts) >= 1, counts
    assert all(c["timeout"] == c["error"] == 0 for c in counts), counts

    total = ray.cluster_resources()["CPU"]
    deadline, state = time.time() + 30, None
    while time.time() < deadline:
        pgs = [(p.placement_group_id, p.state) for p in list_placement_groups(address=_ray_address(), limit=1000)
               if p.state in ("CREATED", "PENDING", "RESCHEDULING")]
        actors = [(a.class_name, a.name) for a in list_actors(address=_ray_address(), limit=1000) if a.state != "DEAD"
                  and (a.class_name in ("TrainController", "RayTrainWorker", "_Server", "TrialRegistry")
                       or (a.name or "").startswith("o2mkd-teacher-"))]
        state = (ray.available_resources().get("CPU", 0.0), pgs, actors)
        if abs(state[0] - total) < 1e-6 and not pgs and not actors:
            break
        time.sleep(1)
    assert abs(state[0] - total) < 1e-6 and not state[1] and not state[2], (total, state)


def _trainable_stub() -> type:
    """The part of Tune's trainable that the clean-up mixin relies on: a trial id, ``setup()`` when it is made,
    a cleanup to chain to. (Made in a function so that Ray ships the class by value: the tests are no module on
    Ray's workers.)"""

    class Trainable:
        cleaned = False

        def __init__(self, trial_id: str):
            self.trial_id = trial_id
            self.setup({})

        def setup(self, config):
            pass

        def cleanup(self):
            self.cleaned = True

    return Trainable


def test_stopping_a_trial_removes_its_pending_worker_group(ray_local, tmp_path):
    """A trial stopped while a segment trainer still waits for CPUs: the trial's cleanup makes the controller give
    up, and its pending worker-group placement group is removed (killing the controller instead leaks that group:
    it gets placed once CPUs free up and holds them for good)."""
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.state import list_placement_groups

    from o2mkd_ray.tune.stopping import StopTrainersOnCleanup

    @ray.remote(num_cpus=0)
    class Trial(StopTrainersOnCleanup, _trainable_stub()):
        """Stands in for a Tune trial's actor: the trial function starts a trainer in a thread, then Tune stops the
        trial (``stop()`` runs the mixin's ``cleanup()``) and kills the actor."""

        def start(self, storage: str) -> None:
            import os
            import threading
            from pathlib import Path

            os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "3"
            from ray.train import RunConfig, ScalingConfig
            from ray.train.torch import TorchTrainer

            from o2mkd_ray.tune.stopping import TrialState

            state = TrialState.open(self.trial_id)  # as the trial function finds it
            state.record(Path(storage) / "trial", [])
            trainer = TorchTrainer(lambda: None,
                                   scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1.5}),
                                   run_config=RunConfig(name="pending", storage_path=storage,
                                                        callbacks=state.train_callbacks()))
            threading.Thread(target=lambda: self._fit(trainer), daemon=True).start()

        def _fit(self, trainer):
            try:
                trainer.fit()
            except Exception:  # noqa: BLE001 - the stopped run fails; that is the point
                pass

        def registered(self) -> int:
            from o2mkd_ray.tune.stopping import TrialState

            return len(ray.get(TrialState.open(self.trial_id).registry.get.remote()))

        def stop(self) -> tuple[bool, bool]:
            from o2mkd_ray.tune.stopping import TrialState

            self.cleanup()
            return self.cleaned, TrialState.open(self.trial_id).stopping()

    def live_pgs():
        return [p.placement_group_id for p in list_placement_groups(address=_ray_address(), limit=1000)
                if p.state in ("CREATED", "PENDING", "RESCHEDULING")]

    total = ray.cluster_resources()["CPU"]
    hog = placement_group([{"CPU": 1.0}])  # leaves 1 CPU: the trainer's 1.5-CPU worker group stays pending
    ray.get(hog.ready(), timeout=60)
    trial = Trial.remote("t-pending")
    ray.get(trial.start.remote(str(tmp_path)))
    deadline = time.time() + 60
    while time.time() < deadline and not (ray.get(trial.registered.remote()) == 1 and len(live_pgs()) >= 2):
        time.sleep(0.5)
    assert len(live_pgs()) >= 2, live_pgs()  # the hog and the pending worker group
    cleaned, stopping = ray.get(trial.stop.remote(), timeout=120)
    assert cleaned and stopping  # the mixin chained to the trainable's own cleanup; the trial is flagged stopping
    counts = json.loads((tmp_path / "trial" / "stopped_trainers.json").read_text())
    assert counts["timeout"] == counts["error"] == 0 and counts["aborted"] + counts["ended"] == 1, counts
    ray.kill(trial)  # as Tune removes a stopped trial's placement group
    remove_placement_group(hog)
    deadline, state = time.time() + 30, None
    while time.time() < deadline:
        state = (ray.available_resources().get("CPU", 0.0), live_pgs())
        if abs(state[0] - total) < 1e-6 and not state[1]:
            break
        time.sleep(1)
    time.sleep(3)  # a leaked group would be placed right after the hog went
    state = (ray.available_resources().get("CPU", 0.0), live_pgs())
    assert abs(state[0] - total) < 1e-6 and not state[1], (total, state)


def test_trial_state_is_shared_by_trial_id_and_a_stop_before_the_start_holds(ray_local, tmp_path):
    """The trainable owns the trial's state from its setup; the trial function finds it by the trial id and
    records what the cleanup needs (here: its teacher actor, which the cleanup then kills). A cleanup that runs
    before the trial function got going leaves the trial flagged as stopping, so that it starts no trainer."""
    import ray

    from o2mkd_ray.tune.stopping import StopTrainersOnCleanup

    @ray.remote(num_cpus=0)
    class Trial(StopTrainersOnCleanup, _trainable_stub()):
        def trial_function(self, out: str | None, teachers: list[str]) -> bool:
            # what run_trial does with the state, as a thread of the same actor
            from o2mkd_ray.tune.stopping import TrialState

            state = TrialState.open(self.trial_id)
            if out is not None:
                state.record(out, teachers)
            return state.stopping()

        def stop(self) -> bool:
            self.cleanup()
            return self.cleaned

    @ray.remote(num_cpus=0)
    class Teacher:
        def ping(self) -> bool:
            return True

    teacher = Teacher.options(name="o2mkd-teacher-t-shared-0").remote()
    assert ray.get(teacher.ping.remote())
    trial = Trial.remote("t-shared")
    assert ray.get(trial.trial_function.remote(str(tmp_path / "a"), ["o2mkd-teacher-t-shared-0"])) is False
    assert ray.get(trial.stop.remote())
    with pytest.raises(ray.exceptions.RayActorError):  # the cleanup found the teacher the trial function recorded
        ray.get(teacher.ping.remote(), timeout=60)
    assert ray.get(trial.trial_function.remote(None, []))  # and the trial is flagged as stopping
    assert not (tmp_path / "a").exists()  # no trainer was running: nothing to write

    early = Trial.remote("t-early")
    assert ray.get(early.stop.remote())  # stopped before the trial function started
    assert ray.get(early.trial_function.remote(str(tmp_path / "b"), [])) is True
    for a in (trial, early):
        ray.kill(a)


def test_the_trial_trainable_stops_its_trainers_on_cleanup():
    """The trainable Tune builds from the search's trial function carries the clean-up mixin (through
    ``tune.with_parameters``), so a stopped trial aborts its trainers."""
    from ray.tune.trainable.function_trainable import wrap_function

    from o2mkd_ray.config.schema import Config
    from o2mkd_ray.tune.stopping import StopTrainersOnCleanup
    from o2mkd_ray.tune.trial import TrialContext, trial_trainable

    ctx = TrialContext(base={}, constants={}, T=T, trials_dir="t", tune_dir="d", cwd=".", search={})
    cls = wrap_function(trial_trainable(ctx, Config()))
    assert issubclass(cls, StopTrainersOnCleanup)
    assert cls.cleanup.__qualname__ == "StopTrainersOnCleanup.cleanup"


def test_trials_skip_the_engine_preflight_only_when_the_search_checked_everything(tiny_overrides, tmp_path):
    """The search runs the engine's pre-flight once; a trial runs it again only in an existing folder (a resumed
    trial) or when the space tunes a key that only the pre-flight checks."""
    import dataclasses

    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.errors import ConfigError
    from o2mkd_ray.tune.plan import trials_need_preflight
    from o2mkd_ray.tune.space import parse_space
    from o2mkd_ray.tune.trial import TrialContext, skip_preflight

    def needs(space: dict) -> bool:
        return trials_need_preflight(parse_space(space))

    assert not needs(SPACE)  # segments, widths and KD weights: checked by the search and the trial itself
    assert not needs({"students.layers_per_block": {"per_segment_randint": [1, 3]}})
    assert needs({"kd.feature_method": {"choice": ["fitnet", "attention"]}})
    assert needs({"students.drop_mid_block": {"choice": [True, False]}})
    assert needs({"data.resolution": {"choice": [8, 16]}})
    ctx = TrialContext(base={}, constants={}, T=T, trials_dir=str(tmp_path), tune_dir="d", cwd=".", search={})
    assert skip_preflight(ctx, tmp_path / "new")
    (tmp_path / "old").mkdir()
    assert not skip_preflight(ctx, tmp_path / "old")
    assert not skip_preflight(dataclasses.replace(ctx, preflight=True), tmp_path / "new")

    # the search's own pre-flight covers what trials then skip: e.g. a budget the engine would reject
    from o2mkd_ray.tune.search import run_tuning

    cfg = from_dict(_base(tiny_overrides))
    with pytest.raises(ConfigError, match="kd.feature_method: unknown 'nope'"):
        run_tuning(cfg, {**SPACE, "budget": {"kd.feature_method": "nope"}}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_leaves_keep_mapping_valued_keys_whole():
    """The tuned keys' values come from config_leaves, not tracking's flatten: a space may tune a mapping-valued
    config key (``students.unet``, ``debug``), and its row and best.yaml need the whole mapping."""
    from o2mkd_ray.tracking.redaction import flatten
    from o2mkd_ray.tune.resolve import config_leaves

    d = {"students": {"width": 0.5, "unet": {"block_out_channels": [4, 8]}}, "debug": {}, "kd": {"lambda_feat": 1}}
    assert config_leaves(d) == {"students.width": 0.5, "students.unet": {"block_out_channels": [4, 8]},
                                "debug": {}, "kd.lambda_feat": 1}
    assert "students.unet" not in flatten(d)  # the twin that is not one
    assert config_leaves({"train": {"stepz": 3}}) == {"train.stepz": 3}  # unknown keys stay, to be named in errors


def test_best_yaml_is_written_in_the_style_of_the_shipped_configs():
    """Sections as blocks, lists of numbers inline (``boundaries: [0, 150, 1000]``), as in pipelines/*.yaml, and the
    dump loads back to the same data."""
    import yaml

    from o2mkd_ray.tune.report import dump_config_yaml

    data = {"segments": {"n": 2, "boundaries": [0, 150, 1000]}, "students": {"width": [0.5, 1.0],
                                                                          "unet": {"block_out_channels": [4, 8]}}}
    text = dump_config_yaml(data)
    assert "boundaries: [0, 150, 1000]" in text and "width: [0.5, 1.0]" in text and "segments:\n" in text
    assert yaml.safe_load(text) == data
