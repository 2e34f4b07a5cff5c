"""The Ray engine for real: N=3 TorchTrainers on a local Ray, `ray job submit` to a real head.

The evidence that segments train at the same time, that DDP ranks agree and that the teacher merges segments'
requests is checked on this module's one run below (the instruments themselves in test_concurrency.py); killed workers, teacher and driver are in test_outside_faults.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

pytestmark = pytest.mark.ray


def _cfg(overrides, *extra):
    from o2mkd_ray.config.loading import load_config

    return load_config(ROOT / "pipelines" / "tiny.yaml", [*overrides, *extra])


@pytest.fixture(scope="module")
def mlflow_url(tmp_path_factory):
    from mlflow_server import start_mlflow_server, stop_mlflow_server

    url, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow_server"))
    yield url
    stop_mlflow_server(proc)


@pytest.fixture(scope="module")
def ray_run(ray_local, tiny_teacher_dir, mlflow_url, tmp_path_factory):
    """ONE real distillation (3 segments on local Ray, segment 0 with 2 DDP workers, shared teacher actor, MLflow
    server, quick eval) that several tests here and in test_concurrency.py inspect: Ray start-up dominates a tiny
    run here, so it is paid once."""
    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.engine.driver import run_distillation

    cfg = load_config(ROOT / "pipelines" / "tiny.yaml", [
        f"teacher.pretrained={tiny_teacher_dir}", f"mlflow.tracking_uri={mlflow_url}", "mlflow.experiment=engine",
        "mlflow.timeout_s=30",  # a busy 2-core CI machine can make the one-worker server slow to answer
        "train.steps=60", "train.checkpoint_every=10", "eval.num_images=8", "eval.steps=4",
        "ray.segment_overrides={'0': {num_workers: 2}}"])
    out = tmp_path_factory.mktemp("engine") / "run"
    seen: list[tuple[int, int]] = []
    report = run_distillation(cfg, out, progress=False, on_progress=lambda k, m: seen.append((k, m["step"])))
    return out, report, seen


def test_three_segments_train_concurrently_against_shared_teacher(ray_run):
    from o2mkd_ray import O2MKDPipeline

    out, report, seen = ray_run
    # three TorchTrainer runs existed, one per segment, each with checkpoints in its own storage folder
    storage = out / "ray"
    assert sorted(p.name for p in storage.iterdir() if p.is_dir()) == ["seg-00", "seg-01", "seg-02"]
    for k in range(3):
        assert [d for d in (storage / f"seg-{k:02d}").glob("checkpoint_*") if d.is_dir()], f"no checkpoint for {k}"

    segs = report["segments"]
    assert [s["boundaries"] for s in segs] == [[0, 333], [333, 667], [667, 1000]]
    # each student's loss went down (KD loss on held-out x_t of its segment, EMA student)
    hist = json.loads((out / "history.json").read_text())
    for k in range(3):
        h = hist[str(k)]
        assert [m["step"] for m in h] == [10, 20, 30, 40, 50, 60]
        assert h[-1]["val_loss"] < h[0]["val_loss"], (k, [m["val_loss"] for m in h])
    # the one teacher actor served all three segments
    t = report["teacher"]
    assert t["mode"] == "actor" and t["replicas"] == 1
    assert set(t["requests_by_segment"]) == {"seg-00", "seg-01", "seg-02"}
    assert all(n >= 60 for n in t["requests_by_segment"].values())
    assert t["multi_client_forwards"] > 0 and t["busy_s"] > 0  # some forwards served several segments at once
    # live progress reached the driver for every segment and step
    assert sorted(seen) == [(k, s) for k in range(3) for s in range(10, 61, 10)]

    pipe = O2MKDPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=3, output_type="np").images
    assert img.shape == (2, 8, 8, 1) and np.isfinite(img).all()
    assert (out / "samples.png").stat().st_size > 1000
    rep = json.loads((out / "report.json").read_text())
    for s in rep["segments"]:
        for key in ("index", "boundaries", "started_at", "finished_at", "steps", "final_loss", "samples_per_s",
                    "params", "macs"):
            assert key in s, key
        assert s["steps"] == 60 and s["params"] > 0 and s["macs"] > 0
    assert {"requests", "mean_batch", "busy_s", "mode", "replicas"} <= set(rep["teacher"]) and rep["wall_s"] > 0
    # the fixed cost of each segment's worker group, from fit() to its loop's first step: inside the training phase
    startup = rep["worker_startup_s"]
    assert sorted(startup) == ["seg-00", "seg-01", "seg-02"], startup
    assert all(0 < v < rep["phases"]["train_s"] for v in startup.values()), (startup, rep["phases"])


def test_run_is_tracked_on_a_real_mlflow_server(ray_run, mlflow_url):
    from mlflow.tracking import MlflowClient

    out, report, _ = ray_run
    info = report["mlflow"]
    assert info["tracking_uri"] == mlflow_url
    client = MlflowClient(mlflow_url)
    parent = client.get_run(info["run_id"])
    assert parent.info.status == "FINISHED"
    p = parent.data.params
    assert p["segments.n"] == "3" and p["students.width"] == "0.5" and p["train.steps"] == "60"
    assert parent.data.tags["o2mkd.num_segments"] == "3"
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{info['run_id']}'")
    assert sorted(c.info.run_name for c in children) == ["seg-00", "seg-01", "seg-02"]
    for c in children:
        h = client.get_metric_history(c.info.run_id, "val_loss")
        assert [m.step for m in sorted(h, key=lambda m: m.step)] == [10, 20, 30, 40, 50, 60]
        assert {"loss_out", "loss_feat", "lr", "samples_per_s", "teacher_latency_ms"} <= set(c.data.metrics)
    names = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"config.json", "report.json", "samples.png", "pipeline", "eval"} <= names, names
    ev = {a.path for a in client.list_artifacts(info["run_id"], "eval")}
    assert "eval/agreement_vs_t.png" in ev and "eval/report.md" in ev
    assert "eval/agreement_mse" in parent.data.metrics
    # the teacher's utilisation (per replica and mean) and the students' wait share reach the parent run
    b = report["bottleneck"]
    name = report["teacher"]["per_replica"][0]["name"]
    assert parent.data.metrics["teacher_utilisation"] == pytest.approx(b["teacher_utilisation"])
    assert parent.data.metrics[f"teacher_utilisation/{name}"] == pytest.approx(b["teacher_utilisation"])
    assert parent.data.metrics["teacher_wait_share"] == pytest.approx(b["teacher_wait_share"])
    assert {f"teacher_wait_share/seg-{k:02d}" for k in range(3)} <= set(parent.data.metrics)
    assert 0 < b["teacher_utilisation"] <= 1 and 0 <= b["teacher_wait_share"] < 1


def test_quick_eval_written_by_distill(ray_run):
    out, report, _ = ray_run
    ev = json.loads((out / "eval" / "report.json").read_text())
    assert np.isfinite(report["eval"]["agreement_mse"]) and report["eval"]["macs_ratio_run"] < 1
    assert ev["fid_backend"] and (out / "eval" / "samples_grid.png").is_file()


def test_local_teacher_mode_and_two_workers_ddp(ray_local, tiny_overrides, tmp_path):
    """teacher.mode=local (a teacher copy per worker, so one per DDP rank) in a 2-worker DDP segment, fractional
    CPUs. One segment: several segments are shown on the module's run."""
    from o2mkd_ray.engine.driver import run_distillation

    cfg = _cfg(tiny_overrides, "segments.n=1", "teacher.mode=local", "train.steps=10", "train.checkpoint_every=5",
               "ray.segment_overrides={'0': {num_workers: 2, cpus_per_worker: 0.25}}")
    report = run_distillation(cfg, tmp_path / "run", progress=False)
    assert report["teacher"]["mode"] == "local" and report["teacher"]["requests"] == 0
    assert [s["steps"] for s in report["segments"]] == [10]
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
    # both ranks of segment 0 reported (rank-R.json, engine/train_loop.py), world size 2, the same weights
    ranks = [json.loads((tmp_path / "run" / "ray" / "seg-00" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(led["rank"], led["world_size"]) for led in ranks] == [(0, 2), (1, 2)]
    r0, r1 = ([(m["step"], m["param_digest"]) for m in led["reports"]] for led in ranks)
    assert r0 == r1 and [step for step, _ in r0] == [5, 10]


def test_progress_queue_killed_from_outside_the_segments_still_finish(ray_local):
    """The driver's live-metrics queue is telemetry: killed with ``ray.kill`` while segments run, the relay drops it
    with a warning and ``fit_all`` still returns every segment (a multi-node run once failed here)."""
    import threading

    import ray

    from o2mkd_ray.engine.trainers import ProgressRelay, fit_all

    seen, killed = [], threading.Event()
    relay = ProgressRelay([lambda k, m: seen.append((k, m["step"]))])

    def fit(k: int, config: dict) -> dict:  # stands in for a segment's trainer: reports, then reports again
        queue = config["progress"][0]
        queue.put({"segment": k, "step": 1})
        killed.wait(60)
        with contextlib.suppress(Exception):  # a worker's put is best-effort too (engine/train_loop.py)
            queue.put_nowait({"segment": k, "step": 2})
        return {"index": k}

    def killer():
        while len(seen) < 2:
            time.sleep(0.05)
        ray.kill(relay.queue.actor)
        killed.set()

    threading.Thread(target=killer, daemon=True).start()
    results = fit_all({0: {}, 1: {}}, fit, relay)
    assert results == {0: {"index": 0}, 1: {"index": 1}}
    assert sorted(seen) == [(0, 1), (1, 1)] and relay.lost is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ray_job_submit_against_a_real_head(tiny_teacher_dir, tmp_path):
    """`ray start --head` on free ports in a temp dir, the real `ray job submit` CLI, SUCCEEDED, outputs; then
    stop that cluster only (the blocking head process group, not `ray stop`)."""
    ray_bin = Path(sys.executable).parent / "ray"
    port, dash, agent, agent_grpc, rt_env = (_free_port() for _ in range(5))
    tmp = Path(f"/tmp/o2r-head-{os.getpid()}")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.3", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={tmp}", "--disable-usage-stats",
         "--include-dashboard=true",
         # the agent's default port 52365 is taken while another local Ray (the module's fixture) runs
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={rt_env}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    out = tmp_path / "job_out"
    try:
        addr = f"http://127.0.0.1:{dash}"
        env_job = {**env, "RAY_ADDRESS": addr}
        while True:  # the dashboard's job server answers a few seconds after the head starts
            r = subprocess.run([str(ray_bin), "job", "list"], env=env_job, capture_output=True, text=True)
            if r.returncode == 0:
                break
            assert head.poll() is None, f"head exited ({head.returncode}): {r.stderr[-2000:]}"
            time.sleep(2)
        cmd = [str(ray_bin), "job", "submit", "--working-dir", str(ROOT), "--runtime-env-json",
               json.dumps({"excludes": [".venv", "runs", ".git", "*.egg-info"]}), "--",
               sys.executable, "-m", "o2mkd_ray.cli", "distill", "pipelines/tiny.yaml",
               "--set", f"teacher.pretrained={tiny_teacher_dir}", "--set", "mlflow.enabled=false",
               "--set", "eval.enabled=false", "--set", "segments.n=1", "--out", str(out)]
        while True:  # the job agent registers a little after the job server answers
            r = subprocess.run(cmd, env=env_job, capture_output=True, text=True)
            if "No available agent" not in r.stdout + r.stderr:
                break
            assert head.poll() is None, f"head exited ({head.returncode})"
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        jobs = subprocess.run([str(ray_bin), "job", "list"], env=env_job, capture_output=True, text=True).stdout
        assert "status=<JobStatus.SUCCEEDED" in jobs and "FAILED" not in jobs, jobs[-2000:]
        rep = json.loads((out / "report.json").read_text())
        assert rep["engine"] == "ray" and len(rep["segments"]) == 1
        assert rep["ray_address"] and str(port) in rep["ray_address"]
        assert (out / "pipeline" / "model_index.json").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------------------------
# concurrency, seen on the one run: reports interleave in time, DDP ranks agree, teacher forwards merge segments

EVERY, STEPS = 10, 60  # the run's train.checkpoint_every and train.steps


def _ranks(out: Path, k: int) -> dict[int, dict]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text())
            for p in (out / "ray" / f"seg-{k:02d}").glob("rank-*.json")}


@pytest.mark.ray
@pytest.mark.slow
def test_segments_step_reports_interleave_in_time(ray_run):
    out, _, _ = ray_run
    hist = json.loads((out / "history.json").read_text())  # every report of every segment, each with its time
    assert {k: [m["step"] for m in h] for k, h in hist.items()} == {
        str(k): list(range(EVERY, STEPS + 1, EVERY)) for k in range(3)}
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
def test_ddp_segment_ranks_report_world_size_two_and_equal_weights(ray_run):
    from diffusers import UNet2DModel

    from o2mkd_ray.engine.train_loop import param_digest

    out, _, _ = ray_run
    ranks = _ranks(out, 0)
    assert sorted(ranks) == [0, 1]
    steps = list(range(EVERY, STEPS + 1, EVERY))
    for r, led in ranks.items():
        assert led["rank"] == r and led["world_size"] == 2
        assert [m["step"] for m in led["reports"]] == steps
    r0, r1 = ranks[0]["reports"], ranks[1]["reports"]
    assert {m["pid"] for m in r0}.isdisjoint({m["pid"] for m in r1})  # two processes
    for m0, m1 in zip(r0, r1):  # the same weights on both ranks after every reported step
        assert m0["param_digest"] == m1["param_digest"], (m0, m1)
        assert m0["kd_digest"] == m1["kd_digest"], (m0, m1)  # the feature-KD adapters too (outside DDP)
    assert len({m["param_digest"] for m in r0}) == len(steps)  # and they change: training moves them
    assert len({m["kd_digest"] for m in r0}) == len(steps)  # tiny.yaml: lambda_feat 0.1, adapters that train
    # the digest is of the weights rank 0 checkpointed: the final checkpoint's student has it
    final = max((d for d in (out / "ray" / "seg-00").glob("checkpoint_*") if d.is_dir()),
                key=lambda d: json.loads((d / "manifest.json").read_text())["step"])
    assert json.loads((final / "manifest.json").read_text())["step"] == steps[-1]
    assert param_digest(UNet2DModel.from_pretrained(final / "student")) == r1[-1]["param_digest"]
    for k in (1, 2):  # one worker each
        assert sorted(_ranks(out, k)) == [0] and _ranks(out, k)[0]["world_size"] == 1


@pytest.mark.ray
@pytest.mark.slow
def test_teacher_forwards_merge_requests_of_several_segments(ray_run):
    out, report, _ = ray_run
    t = report["teacher"]
    assert t["mode"] == "actor" and t["replicas"] == 1
    assert set(t["requests_by_segment"]) == {"seg-00", "seg-01", "seg-02"}
    assert t["multi_client_forwards"] > 0, t
    assert json.loads((out / "report.json").read_text())["teacher"]["multi_client_forwards"] == \
        t["multi_client_forwards"]
    print(f"teacher: {t['forwards']} forwards, {t['multi_client_forwards']} merged requests of several segments")
