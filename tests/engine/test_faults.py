"""The ``debug.*`` rehearsal switches (engine/faults.py): each hook on its own, and a worker and the teacher actor
killed by their switches in one real run, as a user rehearses recovery on a cluster.

The evidence that recovery works comes from kills the run does not know about, done from outside by the tests in
test_outside_faults.py (a worker SIGKILLed, the teacher actor ray.kill-ed, the driver SIGKILLed). Checkpoint
failures (truncated, foreign, fall-back on resume) are tested without Ray in tests/distill/test_loop.py."""

from __future__ import annotations

import json
import time

import pytest
from conftest import ROOT

TINY = ROOT / "pipelines" / "tiny.yaml"


def _cfg(overrides, *extra):
    from o2mkd_ray.config.loading import load_config

    return load_config(TINY, [*overrides, *extra])


# ----------------------------------------------------------------------------------------------------------------
# the debug.* hooks (engine/faults.py), without killing anything: os._exit is replaced by an exception


class _Exited(Exception):
    pass


@pytest.fixture
def no_exit(monkeypatch):
    import o2mkd_ray.engine.faults as faults

    def exit_(code):
        raise _Exited(code)

    monkeypatch.setattr(faults.os, "_exit", exit_)


def test_worker_hook_kills_only_its_worker_at_its_step_once(no_exit, tmp_path):
    from o2mkd_ray.engine.faults import worker_hook

    marker = tmp_path / "killed"
    debug = {"kill_worker": {"segment": 1, "rank": 0, "step": 3, "marker": str(marker)}}
    assert worker_hook({}, 1, 0) is None
    assert worker_hook(debug, 0, 0) is None and worker_hook(debug, 1, 1) is None
    hook = worker_hook(debug, 1, 0)
    hook(2)
    with pytest.raises(_Exited):
        hook(3)
    assert marker.read_text() == "3"
    hook(3)  # the restarted worker passes step 3 again: the marker says it already died once


def test_teacher_hook_exits_once_after_n_requests(no_exit, tmp_path):
    from o2mkd_ray.engine.faults import teacher_fault, teacher_hook

    assert teacher_fault({}, tmp_path) is None and teacher_hook(None) is None
    spec = teacher_fault({"kill_teacher_after_requests": 3}, tmp_path)
    assert spec == {"kill_teacher_after_requests": 3, "marker": str(tmp_path / ".teacher_killed")}
    hook = teacher_hook(spec)
    hook(2)
    with pytest.raises(_Exited):
        hook(3)
    hook(4)  # the restarted actor serves on


def test_driver_watch_exits_once_n_checkpoints_exist(monkeypatch, tmp_path):
    import threading
    import types

    import o2mkd_ray.engine.faults as faults

    exited = threading.Event()
    monkeypatch.setattr(faults.os, "_exit", lambda code: exited.set())
    marker = tmp_path / "killed"
    faults.watch_driver({}, str(tmp_path))  # no switch: no watcher
    faults.watch_driver({"kill_driver_after_checkpoints": 2, "marker": str(marker)}, "s3://bucket/run")  # not watched
    faults.watch_driver({"kill_driver_after_checkpoints": 2, "marker": str(marker)}, str(tmp_path))
    (tmp_path / "seg-00" / "checkpoint_000010").mkdir(parents=True)
    assert not exited.is_set() and not marker.exists()
    (tmp_path / "seg-01" / "checkpoint_000010").mkdir(parents=True)
    exited.wait()
    assert marker.read_text() == "driver killed"
    started = []

    class Recorder:  # stands in for threading.Thread inside faults only
        def __init__(self, **kw):
            started.append(kw)

        def start(self):
            pass

    monkeypatch.setattr(faults, "threading", types.SimpleNamespace(Thread=Recorder))
    faults.watch_driver({"kill_driver_after_checkpoints": 2, "marker": str(marker)}, str(tmp_path))
    assert started == []  # the marker says the driver was killed once already: the rerun is not watched


def test_phase_timer_records_named_phases():
    from o2mkd_ray.engine.phases import PhaseTimer

    timer = PhaseTimer()
    with timer.phase("load_s"):
        pass
    with pytest.raises(ValueError), timer.phase("train_s"):
        raise ValueError("a failed phase is still timed")
    assert list(timer.phases) == ["load_s", "train_s"] and all(v >= 0 for v in timer.phases.values())


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
