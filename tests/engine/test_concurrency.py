"""The instruments of the concurrency evidence, checked on their own without Ray: the weight digest each rank
reports, and the teacher server's count of forwards that merge requests of different segments.

What they show on a real run (step reports interleaving in time, both DDP ranks reporting the same weights, the
shared teacher merging segments' requests) is checked in test_engine.py on that module's one 3-segment run, so
that the suite pays for one Ray run, not two.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from conftest import ROOT, tiny_unet

TINY = ROOT / "pipelines" / "tiny.yaml"


def _cfg(overrides, *extra):
    from o2mkd_ray.config.loading import load_config

    return load_config(TINY, [*overrides, *extra])


# ----------------------------------------------------------------------------------------------------------------
# the instruments, without Ray


def test_param_digest_is_equal_for_equal_weights_only():
    from o2mkd_ray.engine.train_loop import param_digest

    a, b = tiny_unet(seed=0), tiny_unet(seed=0)
    assert param_digest(a) == param_digest(b)

    class Wrapped(torch.nn.Module):  # what DDP looks like: the model under .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert param_digest(Wrapped(b)) == param_digest(a)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-3  # one value: the strided sample starts at index 0
    assert param_digest(b) != param_digest(a)
    assert param_digest(tiny_unet(seed=1)) != param_digest(a)


@pytest.mark.parametrize(("max_batch", "merged"), [(512, 1), (2, 0)])
def test_teacher_counts_forwards_that_merge_requests_of_different_clients(tiny_overrides, max_batch, merged):
    """The teacher server's batching on its own: two requests queued together are one forward when they fit in
    ``max_batch``; only a forward mixing two clients counts as ``multi_client_forwards``."""
    from o2mkd_ray.engine.teacher_service import _Server

    cfg = _cfg(tiny_overrides)
    server = _Server(dict(cfg.teacher.__dict__), None, max_batch=max_batch, max_wait_ms=50, max_concurrency=1)
    x, t = np.zeros((2, 1, 8, 8), np.float32), np.array([10, 500])

    async def both(c1: str, c2: str):  # queued in the same tick: the drainer finds both after its wait
        return await asyncio.gather(server.predict(x, t, client=c1), server.predict(x, t, client=c2))

    asyncio.run(both("seg-00", "seg-01"))
    asyncio.run(both("seg-00", "seg-00"))  # merged too (when it fits), but one client
    s = server.get_stats()
    assert s["requests"] == 4 and s["forwards"] == (2 if merged else 4)
    assert s["multi_client_forwards"] == merged
