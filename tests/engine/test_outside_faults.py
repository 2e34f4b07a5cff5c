"""Fault tolerance shown from outside: the test itself kills a process of a running distillation (SIGKILL of one
segment's Ray Train worker, ``ray.kill`` of the teacher actor, SIGKILL of the driver) at a moment it picks by
watching the run folder, then checks what happened against what it saw on disk. Nothing in the run knows it will
be killed (no ``debug.*`` switch); the rehearsal switches have their own tests in test_faults.py.

Every wait here waits for an event (a checkpoint recorded, a process gone) and fails as soon as the run ends
without it; none compares durations.

What each test reads:
  * ``OUT/ray/seg-KK/checkpoint_*/manifest.json``: the step of every checkpoint folder on disk;
  * ``OUT/ray/seg-KK/checkpoint_manager_snapshot.json``: the checkpoints Ray Train recorded (it resumes from the
    latest one);
  * ``OUT/ray/seg-KK/rank-R.json``: each rank's reports with its pid (``engine/train_loop.py``);
  * Ray's state API (``list_actors``) for the worker processes, ``ps`` for the driver's session.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = ROOT / "pipelines" / "tiny.yaml"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def _cfg(overrides, *extra):
    from o2mkd_ray.config.loading import load_config

    return load_config(TINY, [*overrides, *extra])


# ----------------------------------------------------------------------------------------------------------------
# what a run folder says, read from outside


def _seg_dir(out: Path, k: int) -> Path:
    return out / "ray" / f"seg-{k:02d}"


def _written(out: Path, k: int) -> dict[str, int]:
    """``{checkpoint folder: step}`` for every complete checkpoint folder of segment ``k`` (manifest readable)."""
    steps = {}
    for d in (d for d in _seg_dir(out, k).glob("checkpoint_*") if d.is_dir()):  # not the snapshot file
        try:
            steps[d.name] = int(json.loads((d / "manifest.json").read_text())["step"])
        except (OSError, ValueError, KeyError):  # being written or being deleted right now
            continue
    return steps


def _recorded(out: Path, k: int) -> tuple[int, str] | None:
    """The latest checkpoint Ray Train recorded for segment ``k``: ``(step, folder name)``, or None."""
    try:
        snap = json.loads((_seg_dir(out, k) / SNAPSHOT).read_text())
    except (OSError, ValueError):
        return None
    latest = snap.get("latest_checkpoint_result")
    return (int(latest["metrics"]["step"]), latest["checkpoint_dir_name"]) if latest else None


def _ledger(out: Path, k: int, rank: int = 0) -> list[dict]:
    try:
        return json.loads((_seg_dir(out, k) / f"rank-{rank}.json").read_text())["reports"]
    except (OSError, ValueError, KeyError):
        return []


def _finished(out: Path, k: int) -> bool:
    return (out / "segments" / f"seg-{k:02d}" / "summary.json").is_file()


def _wait_for(what: str, cond, alive):
    """Polls ``cond()`` until it returns something truthy and returns that; fails once ``alive()`` is False and
    ``cond()`` still is not met (the run ended without the event). No clock: the run's own progress is the limit."""
    while True:
        v = cond()
        if v:
            return v
        if not alive():
            v = cond()
            assert v, f"the run ended before {what}"
            return v
        time.sleep(0.1)


class _Thread(threading.Thread):
    """``fn()`` in a thread; :meth:`value` joins and returns its result or raises its error."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            self.error = e

    def value(self):
        self.join()
        if self.error is not None:
            raise self.error
        return self.result


def _train_workers(address: str) -> list:
    """Every RayTrainWorker actor the cluster knows (alive and dead), from Ray's state API."""
    from ray.util.state import list_actors

    return list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                       limit=10_000, raise_on_missing_output=False)


def _bundle_cpus(actor) -> float:
    """The CPUs of the placement-group bundle a worker actor runs in (``ray.segment_overrides`` sets them)."""
    return max(v for key, v in (actor.required_resources or {}).items() if key.startswith("CPU_group_"))


def _assert_loadable(out: Path) -> None:
    from o2mkd_ray import O2MKDPipeline

    pipe = O2MKDPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
               output_type="np").images
    assert img.shape == (1, 8, 8, 1) and np.isfinite(img).all()


# ----------------------------------------------------------------------------------------------------------------
# the driver, SIGKILLed from outside; the same command again
#
# First in this module: it starts its own local Ray in the driver subprocess, before the module's `ray_local`.


def _session(sid: int) -> list[dict]:
    """Every process of session ``sid`` (``ps``): pid, pgid, state, command."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,sid=,stat=,args="], capture_output=True, text=True,
                         check=True).stdout
    procs = []
    for line in out.splitlines():
        pid, pgid, sid_, stat, *args = line.split(None, 4)
        if int(sid_) == sid:
            procs.append({"pid": int(pid), "pgid": int(pgid), "stat": stat, "args": (args or [""])[0][:80]})
    return procs


def _alive(procs: list[dict]) -> list[dict]:
    return [p for p in procs if not p["stat"].startswith("Z")]  # zombies are dead, waiting for init to reap them


def _end_session(sid: int) -> list[dict]:
    """SIGKILLs, one pid at a time, every live process of session ``sid`` (one the test started with
    ``start_new_session``) until none is left, zombies included; returns what was still alive at the start."""
    left = _alive(_session(sid))
    while procs := _session(sid):
        for p in _alive(procs):
            try:
                os.kill(p["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    return left


def _start_cli(args: list[str], log: Path, ray_tmp: Path) -> subprocess.Popen:
    """``python -m o2mkd_ray.cli ARGS`` in its own session (so its local Ray can be found by session id), with its
    Ray temp files under ``ray_tmp``."""
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp)}
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "o2mkd_ray.cli", *args], env=env, cwd=str(ROOT), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)


def test_driver_sigkilled_mid_run_every_unfinished_segment_resumes_from_its_last_checkpoint(tiny_overrides, tmp_path):
    """Once every segment has a recorded checkpoint, the test freezes (SIGSTOP) the workers of segments 1 and 2,
    waits for segment 0 to finish, SIGKILLs the driver, lets Ray's processes run down (the frozen workers thawed),
    removes what is left of that Ray, and runs the same command again: 1 and 2 must resume from their own last
    checkpoints, 0 must not train again."""
    out, steps, every = tmp_path / "run", 120, 10
    done, unfinished = [0], [1, 2]
    args = ["distill", str(TINY), "--out", str(out), "--no-eval", *[a for o in tiny_overrides for a in ("--set", o)],
            "--set", f"train.steps={steps}", "--set", f"train.checkpoint_every={every}"]
    first, again = (Path(tempfile.mkdtemp(prefix=f"o2r-{n}-")) for n in ("k", "r"))  # short: Ray's socket paths
    driver = _start_cli(args, tmp_path / "killed_driver.log", first)
    sid = driver.pid  # start_new_session: the driver leads its own session; Ray's processes stay in it
    rerun, frozen = None, []
    try:
        def checkpointed():
            return all(_recorded(out, k) and _ledger(out, k) for k in range(3)) and not any(
                _finished(out, k) for k in range(3))

        _wait_for("a recorded checkpoint of every segment", checkpointed, lambda: driver.poll() is None)
        for k in unfinished:  # the pid the worker reports is one of the driver's Ray workers
            pid = _ledger(out, k)[-1]["pid"]
            assert [p for p in _session(sid) if p["pid"] == pid and "RayTrainWorker" in p["args"]], pid
            os.kill(pid, signal.SIGSTOP)
            frozen.append(pid)
        _wait_for("segment 0 finished", lambda: _finished(out, 0), lambda: driver.poll() is None)
        at_kill = {k: _recorded(out, k) for k in unfinished}
        written_at_kill = {k: _written(out, k) for k in unfinished}
        os.kill(driver.pid, signal.SIGKILL)
        t_kill = time.time()
        assert driver.wait() == -signal.SIGKILL
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        # the driver's raylet and GCS die with it; its workers (each in a process group of its own) notice and end
        _wait_for("Ray's workers of the killed driver ended", lambda: not [
            p for p in _alive(_session(sid)) if p["pgid"] != sid], lambda: True)
        t_workers_gone = time.time()
        leftovers = _end_session(sid)
        assert _session(sid) == [], "processes of the killed run are left"

        # what the killed run left on disk, now that nothing of it runs
        assert not any(_finished(out, k) for k in unfinished) and not (out / "report.json").exists()
        last = {k: _recorded(out, k) for k in unfinished}
        written = {k: _written(out, k) for k in unfinished}
        for k in unfinished:
            step, name = last[k]
            assert step > 0 and step % every == 0 and step < steps
            assert written[k].get(name) == step, (k, last[k], written[k])  # the recorded one is on disk, complete
            assert step >= at_kill[k][0]  # nothing Ray Train had recorded at the kill is lost
        kept = {k: ((out / "segments" / f"seg-{k:02d}" / "summary.json").read_bytes(),
                    sorted(p.name for p in _seg_dir(out, k).iterdir())) for k in done}

        rerun = _start_cli(args, tmp_path / "rerun.log", again)
        assert rerun.wait() == 0, (tmp_path / "rerun.log").read_text()[-3000:]
        rerun_left = _end_session(rerun.pid)
    finally:
        for pid in frozen:  # a failed wait above: do not leave frozen processes behind
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        _end_session(sid)
        if rerun is not None:
            _end_session(rerun.pid)
        shutil.rmtree(first, ignore_errors=True)
        shutil.rmtree(again, ignore_errors=True)

    rep = json.loads((out / "report.json").read_text())
    segs = {s["index"]: s for s in rep["segments"]}
    hist = json.loads((out / "history.json").read_text())
    assert [segs[k]["steps"] for k in range(3)] == [steps] * 3
    for k in unfinished:  # each resumed from its own last recorded checkpoint, and went on from there
        assert segs[k]["resumed_from"] == last[k][0], (k, segs[k]["resumed_from"], last[k], written[k])
        assert [m["step"] for m in hist[str(k)]] == list(range(last[k][0] + every, steps + 1, every))
    for k in done:  # finished before the kill: not trained again
        assert segs[k]["resumed_from"] == 0
        assert kept[k] == ((out / "segments" / f"seg-{k:02d}" / "summary.json").read_bytes(),
                           sorted(p.name for p in _seg_dir(out, k).iterdir()))
    assert set(rep["teacher"]["requests_by_segment"]) == {f"seg-{k:02d}" for k in unfinished}  # the rerun's
    _assert_loadable(out)

    unrecorded = {k: sorted(s for s in written[k].values() if s > last[k][0]) for k in unfinished}
    orphan = {k: max(written[k].values()) - max(written_at_kill[k].values()) for k in unfinished}
    print(f"driver kill: recorded at the kill {at_kill}; resumed from "
          f"{ {k: segs[k]['resumed_from'] for k in unfinished} }; checkpoint steps the workers added after the "
          f"kill {orphan}; on disk but never recorded (redone) {unrecorded}; workers gone "
          f"{t_workers_gone - t_kill:.1f} s after the kill; alive then: {[p['args'] for p in leftovers]}; "
          f"alive after the rerun's normal exit: {[p['args'] for p in rerun_left]}")


# ----------------------------------------------------------------------------------------------------------------
# one segment's Ray Train worker SIGKILLed, then the teacher actor ray.kill-ed, both from outside, in one run
# (two faults of different kinds in one run: each Ray run costs about a minute of worker start-up on 2 cores)


def test_worker_sigkilled_and_teacher_killed_mid_run_only_that_segment_resumes(ray_local, tiny_overrides, tmp_path):
    """Segment 1's worker asks 0.3 CPU (the others 0.25): that is how the test tells it apart in Ray's state API.
    Once segment 1 has a recorded checkpoint its worker is SIGKILLed; Ray Train (``ray.max_failures`` 2) restarts
    that segment's worker group from its latest checkpoint. Right after, the teacher actor is ``ray.kill``-ed
    (restartable): it comes back as a new process, and the segments whose workers were not killed go on through
    it without restarting."""
    from o2mkd_ray.engine.driver import run_distillation, teacher_run_id
    from o2mkd_ray.engine.teacher_service import actor_names

    steps, every, victim_seg = 120, 10, 1
    cfg = _cfg(tiny_overrides, f"train.steps={steps}", f"train.checkpoint_every={every}",
               "ray.segment_overrides={'1': {cpus_per_worker: 0.3}}")
    assert cfg.ray.max_failures >= 1 and cfg.teacher.max_restarts != 0
    out = tmp_path / "run"
    address = ray_local.get_runtime_context().gcs_address
    before = {a.actor_id for a in _train_workers(address)}
    run = _Thread(lambda: run_distillation(cfg, out, progress=False))
    run.start()

    def moment():
        if _recorded(out, victim_seg) is None or not _ledger(out, victim_seg) or _finished(out, victim_seg):
            return None
        alive = [a for a in _train_workers(address) if a.state == "ALIVE" and a.actor_id not in before]
        return alive if len(alive) == 3 else None

    alive = _wait_for("segment 1's first recorded checkpoint", moment, run.is_alive)
    victim = [a for a in alive if _bundle_cpus(a) == pytest.approx(0.3)]
    assert len(victim) == 1, [(a.pid, a.required_resources) for a in alive]
    victim = victim[0]
    assert _ledger(out, victim_seg)[-1]["pid"] == victim.pid  # the worker's own report names the same process
    others = {a.actor_id: a.pid for a in alive if a is not victim}
    recorded_at_kill = _recorded(out, victim_seg)[0]
    os.kill(victim.pid, signal.SIGKILL)
    written_before = _written(out, victim_seg)  # the victim writes nothing more; its replacement is seconds away
    teacher = ray_local.get_actor(actor_names(teacher_run_id(out), 1)[0])
    old = ray_local.get(teacher.get_stats.remote())
    killed_at_step = old["by_client"][f"seg-{victim_seg:02d}"] - 1 - cfg.train.val_batches  # 1 request per step

    # the teacher, while segment 1 restarts and the others train
    ray_local.kill(teacher, no_restart=False)
    t_kill = time.time()
    # ray.kill is asynchronous: a call right after it may still reach the old process; the restarted one answers
    # with another pid (an actor that does not come back raises RayActorError here)
    def restarted():
        pid = ray_local.get(teacher.ready.remote())["pid"]
        return pid if pid != old["pid"] else None

    new_pid = _wait_for("the teacher actor restarted", restarted, run.is_alive)
    t_back = time.time()

    report = run.value()
    segs = {s["index"]: s for s in report["segments"]}
    assert [segs[k]["steps"] for k in range(3)] == [steps] * 3
    resumed = segs[victim_seg]["resumed_from"]
    assert resumed > 0 and resumed in set(written_before.values()), (resumed, written_before)
    assert resumed >= recorded_at_kill
    hist = json.loads((out / "history.json").read_text())
    assert [m["step"] for m in hist[str(victim_seg)]] == list(range(resumed + every, steps + 1, every))
    led = _ledger(out, victim_seg)
    new_pids = {r["pid"] for r in led if r["step"] > resumed and r["resumed_from"] == resumed}
    assert len(new_pids) == 1 and victim.pid not in new_pids  # reported again, by one new process
    for k in (0, 2):  # the other segments never restarted: same process from first report to last, from step 0
        assert segs[k]["resumed_from"] == 0
        assert [m["step"] for m in hist[str(k)]] == list(range(every, steps + 1, every))
        assert len({r["pid"] for r in _ledger(out, k)}) == 1 and _ledger(out, k)[0]["pid"] in others.values()
    for k in range(3):  # and every segment trained on after the teacher's kill
        assert hist[str(k)][-1]["time"] > t_kill
    # Ray's own record: 4 worker actors in this run, the 0.3-CPU one killed and replaced, the others never replaced
    mine = [a for a in _train_workers(address) if a.actor_id not in before]
    assert sorted(round(_bundle_cpus(a), 2) for a in mine) == [0.25, 0.25, 0.3, 0.3], mine
    assert {a.actor_id for a in mine if _bundle_cpus(a) < 0.3} == set(others)
    t = report["teacher"]  # read from the restarted actor at the end: it served every segment to the end
    assert set(t["requests_by_segment"]) == {"seg-00", "seg-01", "seg-02"}
    assert all(n > 0 for n in t["requests_by_segment"].values())
    _assert_loadable(out)
    print(f"worker kill: segment {victim_seg} killed at about step {killed_at_step}, recorded checkpoint then "
          f"{recorded_at_kill}, resumed from {resumed} ({killed_at_step - resumed} steps redone); teacher kill: "
          f"pid {old['pid']} -> {new_pid}, back after {t_back - t_kill:.1f} s; requests before the kill "
          f"{old['requests']}, after {t['requests']}")
