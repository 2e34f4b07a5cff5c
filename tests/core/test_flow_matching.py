"""Flow-matching training inputs against diffusers' FlowMatchEulerDiscreteScheduler: the forward process is its
scale_noise, and a segment's training timesteps follow the distribution its shifted sampling timesteps have there."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from o2mkd_ray.core.flow_matching import flow_inputs, sample_segment_t
from o2mkd_ray.errors import ConfigError


def test_forward_process_is_the_schedulers_scale_noise():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(7)
    g = torch.Generator().manual_seed(0)
    x_0, eps = torch.randn(7, 4, 2, 2, generator=g), torch.randn(7, 4, 2, 2, generator=g)
    x_t, v = flow_inputs(x_0, eps, sched.timesteps)
    for i, t in enumerate(sched.timesteps):  # 900.22-style float timesteps
        ref = sched.scale_noise(x_0[i:i + 1], t[None], eps[i:i + 1])
        torch.testing.assert_close(x_t[i:i + 1], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, eps - x_0)


@pytest.mark.parametrize("lo, hi", [(0, 300), (300, 700), (700, 1000)])
def test_segment_timesteps_follow_the_shifted_sampling_distribution(lo, hi):
    """The sampler's timesteps (many steps, shift 3) inside [lo, hi) and the training draws have the same quantiles."""
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(20_000)
    ref = sched.timesteps.double()
    ref = ref[(ref >= lo) & (ref < hi)]
    t = sample_segment_t(dict(sched.config), lo, hi, 20_000, torch.Generator().manual_seed(1))
    assert t.min() >= lo and t.max() < hi
    q = torch.linspace(0.05, 0.95, 10, dtype=torch.float64)
    assert torch.allclose(torch.quantile(t, q), torch.quantile(ref, q), atol=0.01 * (hi - lo))
    # the shift matters: uniform draws in the segment would not match (a wrong distribution is caught)
    uniform = lo + (hi - lo) * torch.rand(20_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert not torch.allclose(torch.quantile(uniform, q), torch.quantile(ref, q), atol=0.01 * (hi - lo))


def test_dynamic_shifting_and_segments_outside_the_axis_are_refused():
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True)
    with pytest.raises(ConfigError, match="use_dynamic_shifting"):
        sample_segment_t(dict(sched.config), 0, 500, 4)
    with pytest.raises(ConfigError, match=r"must lie inside \[0, 1000\]"):
        sample_segment_t({"num_train_timesteps": 1000, "shift": 3.0}, 500, 1200, 4)
