"""Failures: checkpoints that are truncated or from another config (plain torch), and real-process fault drills on a
local Ray (a worker and the teacher actor killed in one run; the driver kill is in test_engine.py)."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT

TINY = ROOT / "pipelines" / "tiny.yaml"


def _cfg(overrides, *extra):
    from o2mkd_ray.config.loading import load_config

    return load_config(TINY, [*overrides, *extra])


# ----------------------------------------------------------------------------------------------------------------
# checkpoints (no Ray): SegmentDistiller.save / verify_checkpoint / train_loop._restore


def _distiller(cfg, k: int = 0):
    """A SegmentDistiller for segment k on the tiny teacher, built as driver.run_local builds it."""
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import TeacherFn, load_teacher, sample_shape
    from o2mkd_ray.distill.distiller import SegmentDistiller

    teacher, scheduler = load_teacher(cfg.teacher)
    shape = sample_shape(teacher, cfg.data.channels, cfg.data.resolution)
    segments = Segments.from_config(cfg.segments, scheduler.config.num_train_timesteps)
    fn = TeacherFn(teacher, cfg.kd.feature_blocks)
    channels = fn.feature_channels(shape) if cfg.kd.lambda_feat > 0 else {}
    student = build_students(cfg, teacher, segments.n)[k]
    return SegmentDistiller(cfg, k, segments, scheduler, student, channels), fn


def _train(dist, fn, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x_0 = torch.rand((4, *dist.shape), generator=g) * 2 - 1
        x_t, t, eps = dist.make_inputs(x_0)
        eps_T, feats_T = fn(x_t, t, features=bool(dist.blocks))
        dist.train_step(x_t, t, eps, eps_T, feats_T)


@pytest.fixture
def ckpts(tiny_overrides, tmp_path):
    """Checkpoints at steps 2 and 4 of one distiller, in sibling folders as Ray keeps them."""
    cfg = _cfg(tiny_overrides)
    dist, fn = _distiller(cfg)
    _train(dist, fn, 2)
    c2 = dist.save(tmp_path / "seg-00" / "checkpoint_000002")
    _train(dist, fn, 2)
    c4 = dist.save(tmp_path / "seg-00" / "checkpoint_000004")
    return cfg, dist, fn, c2, c4


def test_save_is_atomic_with_a_manifest(ckpts):
    from o2mkd_ray.distill.checkpoints import MANIFEST, config_hash, verify_checkpoint

    cfg, dist, _, c2, c4 = ckpts
    m = json.loads((c4 / MANIFEST).read_text())
    assert m["step"] == 4 and m["segment"] == 0 and m["boundaries"] == list(dist.segments.boundaries)
    assert m["config_hash"] == config_hash(cfg)
    files = {str(p.relative_to(c4)) for p in c4.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(m["files"]) == files and "train_state.pt" in files
    assert not list(c4.parent.glob("*.tmp-*")), "a temp folder was left behind"
    assert verify_checkpoint(c4, cfg)["step"] == 4
    dist.save(c4)  # overwriting an existing checkpoint folder is atomic as well
    assert verify_checkpoint(c4, cfg)["step"] == 4


@pytest.mark.parametrize("victim", ["student/diffusion_pytorch_model.safetensors", "ema/config.json",
                                    "train_state.pt"])
def test_truncated_file_is_detected(ckpts, victim):
    from o2mkd_ray.distill.checkpoints import verify_checkpoint
    from o2mkd_ray.errors import CheckpointError

    _, _, _, _, c4 = ckpts
    f = c4 / victim
    f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    with pytest.raises(CheckpointError, match=rf"{victim.split('/')[-1]}.*truncated"):
        verify_checkpoint(c4)


def test_missing_file_and_broken_manifest_are_detected(ckpts):
    from o2mkd_ray.distill.checkpoints import MANIFEST, verify_checkpoint
    from o2mkd_ray.errors import CheckpointError

    _, _, _, c2, c4 = ckpts
    (c4 / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="train_state.pt is missing"):
        verify_checkpoint(c4)
    (c2 / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted"):
        verify_checkpoint(c2)
    (c2 / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="not an o2mkd-ray checkpoint"):
        verify_checkpoint(c2)


def test_config_hash_mismatch_is_detected(ckpts, tiny_overrides):
    from o2mkd_ray.distill.checkpoints import verify_checkpoint
    from o2mkd_ray.errors import CheckpointError

    cfg, _, _, _, c4 = ckpts
    verify_checkpoint(c4, cfg)
    other = _cfg(tiny_overrides, "students.width=0.75")
    with pytest.raises(CheckpointError, match="different config"):
        verify_checkpoint(c4, other)
    # what a checkpoint means is teacher/segments/students/kd/data: a new step budget is the same run
    verify_checkpoint(c4, _cfg(tiny_overrides, "train.steps=999"))


def test_load_restores_the_exact_state(ckpts):
    cfg, dist, _, _, c4 = ckpts
    fresh, _ = _distiller(cfg)
    assert fresh.load(c4)["step"] == 4 and fresh.step == 4
    for a, b in zip(fresh.student.state_dict().values(), dist.student.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(fresh.ema.state_dict().values(), dist.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(fresh.gen.get_state(), dist.gen.get_state())
    assert fresh.opt.state_dict()["state"].keys() == dist.opt.state_dict()["state"].keys()


class _FakeCheckpoint:
    """Stand-in for ray.train.Checkpoint on a local folder: ``as_directory()`` yields the path."""

    def __init__(self, path: Path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def test_restore_falls_back_to_the_previous_checkpoint(ckpts):
    from o2mkd_ray.engine.train_loop import restore_checkpoint

    cfg, _, _, _, c4 = ckpts
    w = c4 / "student" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])  # the newest checkpoint is truncated
    fresh, _ = _distiller(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert restore_checkpoint(fresh, _FakeCheckpoint(c4), cfg) == 2
    msgs = [str(w.message) for w in caught]
    assert any("unusable" in m and "checkpoint_000004" in m for m in msgs), msgs
    assert any("earlier checkpoint checkpoint_000002" in m for m in msgs), msgs
    assert fresh.step == 2


def test_restore_with_no_usable_checkpoint_starts_over(ckpts):
    from o2mkd_ray.engine.train_loop import restore_checkpoint

    cfg, _, _, c2, c4 = ckpts
    for c in (c2, c4):
        (c / "train_state.pt").write_bytes(b"")
    fresh, _ = _distiller(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert restore_checkpoint(fresh, _FakeCheckpoint(c4), cfg) == 0
    assert "no usable checkpoint" in str(caught[-1].message), [str(w.message) for w in caught]
    assert fresh.step == 0


# ----------------------------------------------------------------------------------------------------------------
# fault drill with real processes: a train worker and the teacher actor die in the same run


@pytest.mark.slow
@pytest.mark.ray
def test_worker_and_teacher_killed_in_one_run_recover(ray_local, tiny_overrides, tmp_path):
    import ray

    from o2mkd_ray.engine.driver import run_distillation

    worker_marker, teacher_marker = tmp_path / "worker_killed", tmp_path / "teacher_killed"
    cfg = _cfg(tiny_overrides, "train.steps=40", "train.checkpoint_every=10",
               f"debug.kill_worker={{segment: 1, rank: 0, step: 25, marker: '{worker_marker}'}}",
               "debug.kill_teacher_after_requests=60", f"debug.marker={teacher_marker}")
    seen: list[dict] = []  # the teacher actor's stats, polled at every progress report

    def poll_teacher(k: int, m: dict) -> None:
        for name in ray.util.list_named_actors():
            if name.startswith("o2mkd-teacher-"):
                try:
                    s = ray.get(ray.get_actor(name).get_stats.remote(), timeout=20)
                except Exception:  # noqa: BLE001 - restarting right now
                    continue
                seen.append({"time": time.time(), "pid": s["pid"], "started_at": s["started_at"],
                             "requests": s["requests"], "by_client": s["by_client"]})

    t0 = time.time()
    report = run_distillation(cfg, tmp_path / "run", progress=False, on_progress=poll_teacher)
    wall = time.time() - t0

    # both faults happened, once each
    assert worker_marker.read_text() == "25" and teacher_marker.exists()
    # the run finished and every segment reached its step budget
    segs = {s["index"]: s for s in report["segments"]}
    assert [segs[k]["steps"] for k in range(3)] == [40, 40, 40]
    # segment 1 was restarted by Ray Train from its last checkpoint (step 20): 5 steps lost, < one interval
    assert segs[1]["resumed_from"] == 20
    steps_lost = 25 - segs[1]["resumed_from"]
    assert 0 < steps_lost <= cfg.train.checkpoint_every
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [m["step"] for m in hist["1"]] == [30, 40]  # after the restart; never back to step 10
    assert all(m["resumed_from"] == 20 for m in hist["1"])
    # the teacher's crash cost no segment a restart: the clients retried until the actor was back
    assert segs[0]["resumed_from"] == 0 and segs[2]["resumed_from"] == 0
    assert [m["step"] for m in hist["0"]] == [10, 20, 30, 40] and [m["step"] for m in hist["2"]] == [10, 20, 30, 40]
    # the teacher came back as a new process (started after the crash) and kept serving every segment
    killed_at = teacher_marker.stat().st_mtime
    last = seen[-1]
    assert last["started_at"] >= killed_at and last["requests"] > 0, seen
    assert not any(s["pid"] == last["pid"] and s["started_at"] < killed_at for s in seen)
    pids = list(dict.fromkeys(s["pid"] for s in seen))
    t = report["teacher"]  # counted by the restarted actor: requests after the restart only
    assert set(t["requests_by_segment"]) == {"seg-00", "seg-01", "seg-02"}
    assert all(n > 0 for n in t["requests_by_segment"].values())
    print(f"fault drill: worker kill lost {steps_lost} steps, teacher restarted (pids {pids}), wall {wall:.0f} s")
