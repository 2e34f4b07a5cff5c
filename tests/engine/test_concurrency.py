"""Concurrency that can be seen failing: the segments' own step reports interleave in time, both ranks of a
data-parallel segment report the same weights, and the shared teacher runs forwards that merge requests of
different segments.

One real run (3 segments on the module's local Ray, segment 0 with 2 DDP workers, one teacher actor) feeds the Ray
test; the digest and the teacher's counter are first checked on their own, without Ray.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

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


# ----------------------------------------------------------------------------------------------------------------
# one real run


@pytest.fixture(scope="module")
def ddp_run(ray_local, tiny_overrides, tmp_path_factory):
    from o2mkd_ray.engine.driver import run_distillation

    cfg = _cfg(tiny_overrides, "train.steps=120", "train.checkpoint_every=10",
               "ray.segment_overrides={'0': {num_workers: 2}}")
    out = tmp_path_factory.mktemp("concurrency") / "run"
    return out, run_distillation(cfg, out, progress=False), cfg


def _ranks(out: Path, k: int) -> dict[int, dict]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text())
            for p in (out / "ray" / f"seg-{k:02d}").glob("rank-*.json")}


@pytest.mark.ray
@pytest.mark.slow
def test_segments_step_reports_interleave_in_time(ddp_run):
    out, report, cfg = ddp_run
    hist = json.loads((out / "history.json").read_text())  # every report of every segment, each with its time
    every = cfg.train.checkpoint_every
    assert {k: [m["step"] for m in h] for k, h in hist.items()} == {
        str(k): list(range(every, cfg.train.steps + 1, every)) for k in range(3)}
    reports = sorted((m["time"], int(k)) for k, h in hist.items() for m in h)
    seq = [k for _, k in reports]
    # run one after another, the time-sorted segment ids would form 3 contiguous blocks: 2 switches
    switches = sum(a != b for a, b in zip(seq, seq[1:]))
    assert switches > len(hist) - 1, seq
    # and each pair of segments alternates: a report of one between two reports of the other, both ways
    for a in range(3):
        for b in range(3):
            if a != b:
                ta, tb = [t for t, k in reports if k == a], [t for t, k in reports if k == b]
                assert any(ta[0] < x < ta[-1] for x in tb), (a, b, seq)
    # the training windows [first report, last report] of all segments overlap
    assert max(h[0]["time"] for h in hist.values()) < min(h[-1]["time"] for h in hist.values())
    print(f"report order by time: {''.join(map(str, seq))} ({switches} switches)")


@pytest.mark.ray
@pytest.mark.slow
def test_ddp_segment_ranks_report_world_size_two_and_equal_weights(ddp_run):
    from diffusers import UNet2DModel

    from o2mkd_ray.engine.train_loop import param_digest

    out, report, cfg = ddp_run
    ranks = _ranks(out, 0)
    assert sorted(ranks) == [0, 1]
    steps = list(range(cfg.train.checkpoint_every, cfg.train.steps + 1, cfg.train.checkpoint_every))
    for r, led in ranks.items():
        assert led["rank"] == r and led["world_size"] == 2
        assert [m["step"] for m in led["reports"]] == steps
    r0, r1 = ranks[0]["reports"], ranks[1]["reports"]
    assert {m["pid"] for m in r0}.isdisjoint({m["pid"] for m in r1})  # two processes
    for m0, m1 in zip(r0, r1):  # the same weights on both ranks after every reported step
        assert m0["param_digest"] == m1["param_digest"], (m0, m1)
    assert len({m["param_digest"] for m in r0}) == len(steps)  # and they change: training moves them
    # the digest is of the weights rank 0 checkpointed: the final checkpoint's student has it
    final = max((d for d in (out / "ray" / "seg-00").glob("checkpoint_*") if d.is_dir()),
                key=lambda d: json.loads((d / "manifest.json").read_text())["step"])
    assert json.loads((final / "manifest.json").read_text())["step"] == steps[-1]
    assert param_digest(UNet2DModel.from_pretrained(final / "student")) == r1[-1]["param_digest"]
    for k in (1, 2):  # one worker each
        assert sorted(_ranks(out, k)) == [0] and _ranks(out, k)[0]["world_size"] == 1


@pytest.mark.ray
@pytest.mark.slow
def test_teacher_forwards_merge_requests_of_several_segments(ddp_run):
    out, report, cfg = ddp_run
    t = report["teacher"]
    assert t["mode"] == "actor" and t["replicas"] == 1
    assert set(t["requests_by_segment"]) == {"seg-00", "seg-01", "seg-02"}
    assert t["multi_client_forwards"] > 0, t
    assert json.loads((out / "report.json").read_text())["teacher"]["multi_client_forwards"] == \
        t["multi_client_forwards"]
    print(f"teacher: {t['forwards']} forwards, {t['multi_client_forwards']} merged requests of several segments")
