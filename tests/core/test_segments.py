"""Segments: coverage, ownership, sampling, construction paths, validation messages, serialisation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from o2mkd_ray.config.schema import SegmentsConfig
from o2mkd_ray.core.segments import Segments
from o2mkd_ray.errors import ConfigError


def test_uniform_boundaries_and_properties():
    seg = Segments.uniform(num_train_timesteps=1000, n=3)
    assert seg.boundaries == (0, 333, 667, 1000)
    assert seg.n == 3 and seg.num_train_timesteps == 1000
    assert [seg.range(k) for k in range(3)] == [(0, 333), (333, 667), (667, 1000)]
    with pytest.raises(IndexError):
        seg.range(3)


@pytest.mark.parametrize("T,n", [(1000, 1), (1000, 3), (1000, 7), (10, 10), (5, 2)])
def test_every_timestep_has_exactly_one_owner(T, n):
    seg = Segments.uniform(T, n)
    owners = [seg.owner(t) for t in range(T)]
    for t, k in enumerate(owners):
        lo, hi = seg.range(k)
        assert lo <= t < hi
        assert sum(seg.range(j)[0] <= t < seg.range(j)[1] for j in range(n)) == 1
    assert sorted(set(owners)) == list(range(n))  # no empty segment
    # the tensor path agrees with the scalar path, keeps shape and returns int64
    t = torch.arange(T).reshape(-1, 1)
    out = seg.owner(t)
    assert out.dtype == torch.long and out.shape == t.shape
    assert out.flatten().tolist() == owners


def test_owner_floors_floats_and_clamps():
    seg = Segments([0, 300, 700, 1000])
    assert seg.owner(299.9) == 0 and seg.owner(300) == 1 and seg.owner(300.0) == 1
    assert seg.owner(-5) == 0 and seg.owner(1000) == 2 and seg.owner(10**6) == 2
    t = torch.tensor([299.9, 300.0, 699.5, 700.0, -3.0, 1e6])
    assert seg.owner(t).tolist() == [0, 1, 1, 2, 0, 2]
    assert seg.owner(torch.tensor(450)).item() == 1  # 0-d tensor
    with pytest.raises(TypeError):
        seg.owner("300")


def reference_owner(bounds, t: float) -> int:
    """The definition: the k with b_k <= t < b_k+1 (t >= T: the last segment, t < 0: the first)."""
    return max([0] + [k for k in range(len(bounds) - 1) if bounds[k] <= t])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_owner_is_exact_for_continuous_timesteps(dtype):
    bounds = [0, 137, 300, 901, 1000]
    seg = Segments(bounds)
    g = torch.Generator().manual_seed(0)
    edges = [v + d for b in bounds for v in (float(b),) for d in (0.0, 1e-3, -1e-3)]
    t = torch.cat([torch.rand(500, generator=g, dtype=torch.float64) * 1000,
                   torch.tensor([900.22, 900.999, 901.0, 999.9999, 1000.0, 0.0, *edges])]).to(dtype)
    values = t.double().tolist()  # the values as the model would receive them in this dtype
    want = [reference_owner(bounds, v) for v in values]
    assert seg.owner(t).tolist() == want  # tensor path
    assert [seg.owner(v) for v in values] == want  # scalar path
    assert seg.owner(900.22) == 2 and seg.owner(901.0) == 3 and seg.owner(1000.0) == 3
    just_below = torch.nextafter(torch.tensor(300.0, dtype=torch.float32), torch.tensor(0.0))
    assert seg.owner(just_below).item() == 1 and seg.owner(float(just_below)) == 1


def test_owner_of_flow_matching_timesteps_is_the_segment_holding_them():
    """FlowMatchEuler's shifted float timesteps (what an SD3 transformer receives) route by the same definition."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(13)
    bounds = [0, 503, 971, 1000]  # just above 502.985 and 970.681: rounding instead of flooring would cross them
    seg = Segments(bounds)
    ts = sched.timesteps  # float32, from 1000.0 down, non-integer in between
    assert any(float(v) != int(float(v)) for v in ts)
    assert seg.owner(ts).tolist() == [reference_owner(bounds, float(v)) for v in ts]
    assert seg.owner(ts[0]).item() == 2  # t = T at sigma = 1
    assert seg.owner(ts).tolist().count(1) == 8  # 970.68 .. 602.15


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_t_stays_in_segment(seed):
    seg = Segments([0, 1, 300, 700, 1000])  # includes a one-step segment
    g = torch.Generator().manual_seed(seed)
    for k in range(seg.n):
        lo, hi = seg.range(k)
        t = seg.sample_t(k, 256, generator=g)
        assert t.dtype == torch.long and t.shape == (256,)
        assert int(t.min()) >= lo and int(t.max()) < hi
        assert (seg.owner(t) == k).all()
    # same seed, same draws
    a = seg.sample_t(2, 8, generator=torch.Generator().manual_seed(seed))
    b = seg.sample_t(2, 8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(a, b)


def test_from_fractions_and_from_config():
    seg = Segments.from_fractions(1000, [0.3, 0.7])
    assert seg.boundaries == (0, 300, 700, 1000)
    assert Segments.from_config(SegmentsConfig(fractions=[0.3, 0.7]), 1000) == seg
    assert Segments.from_config(SegmentsConfig(boundaries=[0, 300, 700, 1000]), 1000) == seg
    assert Segments.from_config(SegmentsConfig(n=4), 1000) == Segments.uniform(1000, 4)


@pytest.mark.parametrize(
    "make,words",
    [
        (
            lambda: Segments([0, 300, 500, 400, 1000]),
            ["segments.boundaries", "not strictly increasing", "index 3"],
        ),
        (lambda: Segments([10, 300, 1000]), ["segments.boundaries", "must start at 0"]),
        (lambda: Segments([0, 300, 300, 1000]), ["segments.boundaries", "empty segment 1"]),
        (lambda: Segments([0]), ["segments.boundaries", "at least 2"]),
        (lambda: Segments([0, 2.5, 10]), ["segments.boundaries", "not an integer"]),
        (lambda: Segments.uniform(10, 11), ["segments.n", "cannot fit"]),
        (lambda: Segments.from_fractions(1000, [0.6, 0.3]), ["segments.fractions[1]", "increase strictly"]),
        (lambda: Segments.from_fractions(10, [0.31, 0.34]), ["segments.fractions", "empty"]),
        (
            lambda: Segments.from_config(SegmentsConfig(boundaries=[0, 300, 900]), 1000),
            ["segments.boundaries", "last value 900", "num_train_timesteps (1000)"],
        ),
    ],
)
def test_validation_errors_are_one_line_and_name_the_key(make, words):
    with pytest.raises(ConfigError) as e:
        make()
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_json_round_trip():
    seg = Segments([0, 100, 250, 1000])
    assert Segments.from_json(seg.to_json()) == seg
    assert Segments.from_dict(seg.to_dict()) == seg
    assert seg.to_dict()["boundaries"] == [0, 100, 250, 1000]
    assert seg != Segments([0, 100, 1000]) and hash(seg) == hash(Segments([0, 100, 250, 1000]))
    assert repr(seg) == "Segments(boundaries=[0, 100, 250, 1000])"


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=2000), st.data())
def test_uniform_property(T, data):
    n = data.draw(st.integers(min_value=1, max_value=min(T, 64)))
    seg = Segments.uniform(T, n)
    b = seg.boundaries
    assert b[0] == 0 and b[-1] == T and len(b) == n + 1
    assert all(b[i] < b[i + 1] for i in range(n))
    t = data.draw(st.integers(min_value=0, max_value=T - 1))
    k = seg.owner(t)
    assert b[k] <= t < b[k + 1]
    assert seg.owner(torch.tensor([t])).item() == k
