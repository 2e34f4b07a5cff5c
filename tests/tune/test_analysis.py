"""Teacher feature statistics per timestep, the box plot, and the optimal-segmentation boundary proposal."""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import pytest
import yaml
from conftest import ROOT


def _cfg(tiny_overrides, *extra):
    from o2mkd_ray.config.loading import load_config

    return load_config(ROOT / "pipelines" / "tiny.yaml", [*tiny_overrides, *extra])


def test_dp_recovers_planted_change_points():
    from o2mkd_ray.tune.analysis import optimal_segmentation

    rng = np.random.default_rng(0)
    planted = [17, 55, 90]
    levels = rng.normal(0, 3, size=(4, 3))
    X = np.concatenate([np.repeat(levels[k:k + 1], b - a, 0)
                        for k, (a, b) in enumerate(zip([0, *planted], [*planted, 120]))])
    X += rng.normal(0, 0.3, X.shape)  # noise well below the level differences
    assert optimal_segmentation(X, 4) == planted
    assert optimal_segmentation(X[:, 0], 1) == []
    # a step in only one of many dimensions is still found
    Y = rng.normal(0, 0.05, (60, 8))
    Y[33:, 5] += 1.0
    assert optimal_segmentation(Y, 2) == [33]


def test_dp_is_optimal_against_brute_force():
    from o2mkd_ray.tune.analysis import optimal_segmentation, segmentation_cost

    rng = np.random.default_rng(1)
    for trial in range(20):
        m, n = int(rng.integers(4, 10)), int(rng.integers(1, 4))
        X = rng.normal(size=(m, 2))
        best = min(segmentation_cost(X, list(c)) for c in itertools.combinations(range(1, m), n - 1))
        got = optimal_segmentation(X, n)
        assert len(got) == n - 1 and got == sorted(set(got)) and all(0 < c < m for c in got)
        assert segmentation_cost(X, got) == pytest.approx(best, abs=1e-9)
    with pytest.raises(Exception, match="cannot split"):
        optimal_segmentation(np.zeros((3, 1)), 4)


def test_boundaries_from_starts_are_valid():
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.tune.analysis import boundaries_from_starts, timestep_grid

    grid = timestep_grid(1000, 50)
    assert grid[0] == 0 and grid[-1] == 999 and len(grid) == 50
    b = boundaries_from_starts(grid, [10, 11, 40], 1000)
    Segments(b)  # strictly increasing from 0, raises otherwise
    assert b[0] == 0 and b[-1] == 1000 and len(b) == 5
    assert grid[9] < b[1] <= grid[10]  # halfway between the grid points on either side
    dense = list(range(10))  # grid spacing 1: cuts land on the grid points themselves
    assert boundaries_from_starts(dense, [1, 2, 9], 10) == [0, 1, 2, 9, 10]


def test_analyze_on_tiny_teacher_writes_plot_and_valid_boundaries(tiny_overrides, tmp_path):
    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.tune.analysis import analyze, feature_stats, propose_boundaries, stat_columns

    cfg = _cfg(tiny_overrides)
    res = analyze(cfg, tmp_path, n=3, num_images=8, num_timesteps=12)
    d = tmp_path / "analysis"
    b = res["boundaries"]
    assert len(b) == 4 and b[0] == 0 and b[-1] == 1000 and all(x < y for x, y in zip(b, b[1:]))
    assert (d / "feature_boxplot.png").stat().st_size > 5000
    stats = json.loads(json.dumps(res))  # JSON-safe result
    assert stats["files"] == [str(d / "stats.csv"), str(d / "feature_boxplot.png"), str(d / "boundaries.yaml")]
    snippet = yaml.safe_load((d / "boundaries.yaml").read_text())
    assert snippet == {"segments": {"boundaries": b}}
    # the snippet drops into a config as is
    merged = from_dict({**cfg.to_dict(), "segments": {**snippet["segments"], "n": 3}})
    assert merged.segments.boundaries == b
    import pandas as pd

    table = pd.read_csv(d / "stats.csv")
    assert {"t", "block", "segment", *stat_columns()} <= set(table.columns)
    assert len(table) == 12 * table["block"].nunique() and table["block"].nunique() == 5  # 2 down, mid, 2 up
    assert (table["q05"] <= table["q50"]).all() and (table["q50"] <= table["q95"]).all() and (table["std"] > 0).all()
    # optimal on the grid: never worse than equal segments in the same measure
    assert res["within_ss"] <= res["within_ss_uniform"] + 1e-9
    # same proposal from precomputed stats, and for other n
    st = feature_stats(cfg, num_images=8, num_timesteps=12)
    assert propose_boundaries(cfg, 3, stats=st) == b
    for n in (1, 2, 5):
        bn = propose_boundaries(cfg, n, stats=st)
        assert len(bn) == n + 1 and bn[0] == 0 and bn[-1] == 1000 and all(x < y for x, y in zip(bn, bn[1:]))


def test_analyze_cli_hooks(tiny_overrides, tmp_path, capsys):
    from o2mkd_ray.cli.analyze import add_analyze_parser, run_analyze_cli

    p = argparse.ArgumentParser()
    add_analyze_parser(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["analyze", str(ROOT / "pipelines" / "tiny.yaml"), "--n", "2", "--out", str(tmp_path),
                         "--images", "4", "--timesteps", "8", *[a for o in tiny_overrides for a in ("--set", o)]])
    assert run_analyze_cli(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed["segments"]["boundaries"]) == 3
    assert (tmp_path / "analysis" / "feature_boxplot.png").is_file()


def test_analyze_rejects_bad_input(tiny_overrides, tmp_path):
    from o2mkd_ray.errors import ConfigError
    from o2mkd_ray.tune.analysis import analyze

    cfg = _cfg(tiny_overrides)
    with pytest.raises(ConfigError, match="--n"):
        analyze(cfg, tmp_path, n=0)
    with pytest.raises(ConfigError, match="no block"):
        analyze(cfg, tmp_path, n=2, num_images=2, num_timesteps=4, blocks=["down_blocks.7"])
    with pytest.raises(ConfigError, match="cannot split"):
        analyze(cfg, tmp_path, n=9, num_images=2, num_timesteps=4)
