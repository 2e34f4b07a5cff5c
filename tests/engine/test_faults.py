"""The ``debug.*`` rehearsal switches (engine/faults.py): each hook on its own, its process exit replaced by an
exception. (A real run with both switches on is ``benchmarks/fault_drills.py``; it is not repeated here because the
recovery it rehearses is already proven by real outside kills.)

The evidence that recovery works comes from kills the run does not know about, done from outside by the tests in
test_outside_faults.py (a worker SIGKILLed, the teacher actor ray.kill-ed, the driver SIGKILLed). Checkpoint
failures (truncated, foreign, fall-back on resume) are tested without Ray in tests/distill/test_loop.py."""

from __future__ import annotations

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
