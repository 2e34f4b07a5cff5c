"""benchmarks/transformer_speed.py counts what the architecture implies: its MACs for the DiT teacher and its half-depth,
half-width and combined students equal an independent count from DiT's layer shapes, and its speedup and
efficiency columns are the stated arithmetic of the times it is given (no timed assertions)."""

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import transformer_speed as ts

from o2mkd_ray.core.costs import count_macs

CFG = ts.dit_s_config(sample_size=8, num_layers=4, heads=4)  # 16 tokens, hidden 256, 4 blocks


def dit_macs(cfg: dict, layers: int, heads: int) -> int:
    """MACs of one DiT forward per image from its layer shapes (N tokens of width d, patch p):
    per block attention scores 2 N^2 d, q/k/v/out 4 N d^2, MLP 8 N d^2, adaLN-zero's own timestep MLP and
    modulation 256 d + 7 d^2; outside the blocks the patch embedding N p^2 C_in d, the final layer's timestep MLP
    again 256 d + d^2, its modulation 2 d^2 and its projection N d p^2 C_out."""
    p = cfg["patch_size"]
    n, d = (cfg["sample_size"] // p) ** 2, heads * cfg["attention_head_dim"]
    block = 2 * n * n * d + 12 * n * d * d + 256 * d + 7 * d * d
    outside = n * p * p * cfg["in_channels"] * d + 256 * d + 3 * d * d + n * d * p * p * cfg["out_channels"]
    return layers * block + outside


@pytest.fixture(scope="module")
def costs():
    return ts.cost_rows(ts.build_models("dit", CFG))


def test_per_block_count_matches_the_architecture():
    """The architecture formula is right for this diffusers DiT: a second block adds exactly one block's MACs."""
    one, two = (count_macs(DiTTransformer2DModel(**{**CFG, "num_layers": k}).eval()) for k in (1, 2))
    assert two - one == dit_macs(CFG, 2, 4) - dit_macs(CFG, 1, 4)
    assert one == dit_macs(CFG, 1, 4)
    assert sum(ts.block_shares(CFG).values()) == two - one


def test_macs_and_ratios_are_what_the_architecture_implies(costs):
    """Half depth keeps 2 of 4 blocks at width 256; half width keeps 2 of 4 heads (width 128) in all 4 blocks."""
    expected = {"teacher": (4, 4), "half depth": (2, 4), "half width": (4, 2), "half depth + half width": (2, 2)}
    teacher = dit_macs(CFG, 4, 4)
    assert list(costs) == list(expected)
    for label, (layers, heads) in expected.items():
        assert costs[label]["blocks"] == layers and costs[label]["hidden"] == heads * 64, label
        assert costs[label]["macs"] == dit_macs(CFG, layers, heads), label
        assert costs[label]["macs_ratio"] == pytest.approx(dit_macs(CFG, layers, heads) / teacher, rel=1e-12)
    # half depth at the same width: the ratio is the share of the blocks kept plus what lies outside them
    block = dit_macs(CFG, 1, 4) - dit_macs(CFG, 0, 4)
    assert costs["half depth"]["macs_ratio"] == pytest.approx((teacher - 2 * block) / teacher, rel=1e-12)
    assert 0.5 < costs["half depth"]["macs_ratio"] < 0.6
    assert 0.25 < costs["half width"]["macs_ratio"] < 0.5  # d^2 terms quarter, attention scores halve


def test_speedup_and_efficiency_are_the_stated_arithmetic(costs):
    """Given times (not measured), speedup is teacher median / student median and efficiency speedup x MACs
    ratio; the markdown shows every variant."""
    times = {label: {"wall": [2.0, 9.0, 2.0], "cpu": [2.0, 2.0, 2.0]} for label in costs}
    times["half width"] = {"wall": [1.0, 0.5, 5.0], "cpu": [1.0, 1.0, 1.0]}
    rows = {r["variant"]: r for r in ts.summarize(costs, times, batch=4, model_name="DiT")}
    hw = rows["half width"]
    assert hw["speedup"] == pytest.approx(2.0) and hw["ms_median"] == pytest.approx(1000.0)
    assert hw["efficiency"] == pytest.approx(2.0 * costs["half width"]["macs_ratio"])
    assert hw["efficiency_fastest"] == pytest.approx(4.0 * costs["half width"]["macs_ratio"])
    assert hw["efficiency_cpu"] == pytest.approx(2.0 * costs["half width"]["macs_ratio"])
    assert rows["teacher"]["speedup"] == 1.0 and rows["teacher"]["efficiency"] == 1.0
    table = ts.markdown(list(rows.values()))
    assert all(f"| {label} |" in table for label in costs)


def test_every_model_runs_once_per_round():
    """The timing loop runs each model once per round on its own inputs (rotated order), no time checked."""
    torch.manual_seed(0)
    models = ts.build_models("dit", {**CFG, "num_layers": 2, "sample_size": 4})
    calls = []
    for label, m in models.items():
        m.register_forward_hook(lambda mod, args, kw_out, label=label: calls.append(label))
    times = ts.time_forwards(models, batch=2, reps=2, log=lambda *_: None)
    assert {k: len(v["wall"]) for k, v in times.items()} == {k: 2 for k in models}
    names = list(models)
    assert calls == names + names + names[1:] + names[:1]  # warm-up, round 1, round 2 rotated by one


def test_op_split_finds_the_ops_the_macs_count():
    """The op split recognises this torch's matmul and attention kernels (were the SDPA kernel renamed, attention
    would silently fall into "other ops" and the reading of the table would be wrong)."""
    models = ts.build_models("dit", {**CFG, "num_layers": 1, "sample_size": 4})
    split = ts.op_split(models, batch=1, reps=1)
    assert list(split) == list(models)
    for label, groups in split.items():
        assert list(groups) == ["matmul", "attention", "convolution", "other ops"], label
        assert groups["matmul"] > 0 and groups["attention"] > 0 and groups["convolution"] > 0, (label, groups)
    assert "| half width |" in ts.op_split_markdown(split, ts.cost_rows(models), batch=1)
