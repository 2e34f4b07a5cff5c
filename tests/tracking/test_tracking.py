"""MLflow tracking from the driver: embedded SQLite store, a real ``mlflow server``, and a dead or hung server."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_unet
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from mlflow_server import free_port, start_mlflow_server, stop_mlflow_server

from o2mkd_ray import MultiStudentUNet, O2MKDPipeline
from o2mkd_ray.config.loading import from_dict
from o2mkd_ray.tracking.http_env import HTTP_ENV
from o2mkd_ray.tracking.redaction import config_params, redact
from o2mkd_ray.tracking.store import resolve_tracking_uri
from o2mkd_ray.tracking.tracker import RunTracker

BOUNDS = [0, 300, 1000]
TOKEN = "tok-4f1d2c9a"  # a debug.token value that must never reach MLflow


def make_cfg(**mlflow):
    return from_dict({
        "name": "trk", "segments": {"boundaries": BOUNDS}, "students": {"width": [0.5, 0.25]},
        "ray": {"address": "ray://alice:hunter2@head:10001"}, "debug": {"token": TOKEN},
        "mlflow": {"experiment": "o2mkd-test", **mlflow},
    })


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pipe") / "pipeline"
    from diffusers import DDIMScheduler

    students = MultiStudentUNet([tiny_unet(seed=0).eval(), tiny_unet(seed=1).eval()], boundaries=BOUNDS)
    O2MKDPipeline(students=students, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(d)
    return d


def feed(tracker: RunTracker, steps=(10, 20, 30), segments=(0, 1)) -> None:
    for step in steps:
        for k in segments:
            tracker.on_progress(k, {"step": step, "loss": 1.0 / step + k, "loss_avg": 0.5, "lr": 1e-3,
                                    "val_loss": float("nan"), "segment": k, "time": time.time(),
                                    "resumed_from": 0, "note": "text is skipped"})


def all_strings(client: MlflowClient, run_ids) -> str:
    out = []
    for rid in run_ids:
        d = client.get_run(rid).data
        out += [f"{k}={v}" for k, v in {**d.params, **d.tags}.items()]
    return "\n".join(out)


def children(client: MlflowClient, run) -> dict[str, object]:
    runs = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    return {r.info.run_name: r for r in runs}


# --------------------------------------------------------------------------------------------------------------


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "runs" / "a"
    assert resolve_tracking_uri(make_cfg(), out) == f"sqlite:///{tmp_path}/runs/mlflow.db"  # absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(make_cfg(), out) == "http://env:5000"
    assert resolve_tracking_uri(make_cfg(tracking_uri="http://cfg:5000"), out) == "http://cfg:5000"


def test_redaction():
    assert redact("mlflow.tracking_uri", "http://user:secret@host:5000/x") == "http://host:5000/x"
    assert redact("debug.token", "abc") == "***"
    assert redact("data.path", "s3://b/k?X-Amz-Signature=deadbeef&a=1") == "s3://b/k?X-Amz-Signature=***&a=1"
    assert redact("note", "use hf_" + "a" * 30) == "use ***"
    assert redact("data.image_key", "image") == "image"  # a config key that merely ends in "key" stays
    assert config_params({"a": {"b": [1, 2], "c": None, "d": {}}}) == {"a.b": "[1, 2]", "a.c": "None", "a.d": "{}"}
    assert len(config_params({"x": "v" * 10_000})["x"]) == 6000  # MLflow's MAX_PARAM_VAL_LENGTH
    assert RunTracker("https://u:p@mlflow.example").tracking_uri == "https://mlflow.example"


def test_embedded_store(tmp_path, monkeypatch, pipeline_dir):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_cfg(tracking_uri="http://user:secret@host:5000")  # in params only: the tracker gets sqlite
    out = tmp_path / "runs" / "a"
    uri = resolve_tracking_uri(make_cfg(), out)
    extra = tmp_path / "samples.png"
    extra.write_bytes(b"png")

    tracker = RunTracker(uri)
    rid = tracker.start(cfg, out, tags={"endpoint": "https://bob:pw@example.com/x", "api_key": "k-123"})
    assert rid and tracker.run_id == rid and tracker.tracking_uri == uri
    feed(tracker)
    tracker.log_metrics({"macs_ratio_per_step": 0.25, "samples": {"wall_s": 1.5}, "name": "x"})
    tracker.log_artifacts([extra, pipeline_dir.parent], artifact_path="extra")
    t0 = time.time()
    model_uri = tracker.log_pipeline(pipeline_dir)
    model_s = time.time() - t0
    tracker.finish()
    assert tracker.not_logged == [], tracker.not_logged
    print(f"pyfunc model logged in {model_s:.1f} s")

    client = MlflowClient(uri)
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.info.run_name == "trk"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "o2mkd-test" and exp.artifact_location == str(tmp_path / "runs" / "mlartifacts" / "o2mkd-test")
    p = run.data.params
    assert p["train.lr"] == "0.001" and p["segments.boundaries"] == "[0, 300, 1000]"
    assert p["students.width"] == "[0.5, 0.25]" and p["kd.feature_method"] == "fitnet"
    assert p["mlflow.tracking_uri"] == "http://host:5000" and p["debug.token"] == "***"
    assert p["ray.address"] == "ray://head:10001"
    t = run.data.tags
    assert t["o2mkd.version"] == "0.1.0" and t["o2mkd.num_segments"] == "2" and t["o2mkd.out"] == str(out)
    assert t["o2mkd.ray_address"] == "ray://head:10001" and t["endpoint"] == "https://example.com/x"
    assert t["api_key"] == "***" and len(t.get("mlflow.source.git.commit", "0" * 40)) == 40
    assert run.data.metrics["macs_ratio_per_step"] == 0.25 and run.data.metrics["samples.wall_s"] == 1.5

    kids = children(client, run)
    assert sorted(kids) == ["seg-00", "seg-01"]
    for k, name in enumerate(["seg-00", "seg-01"]):
        child = kids[name]
        assert child.info.status == "FINISHED"
        assert child.data.params["boundaries"] == f"[{BOUNDS[k]}, {BOUNDS[k + 1]})"
        assert child.data.params["width"] == ["0.5", "0.25"][k]
        hist = client.get_metric_history(child.info.run_id, "loss")
        assert [(m.step, round(m.value, 6)) for m in hist] == [(s, round(1.0 / s + k, 6)) for s in (10, 20, 30)]
        assert set(child.data.metrics) == {"loss", "loss_avg", "lr", "val_loss", "resumed_from"}

    assert {a.path for a in client.list_artifacts(rid)} >= {"config.json", "pipeline", "extra"}
    assert {a.path for a in client.list_artifacts(rid, "extra")} == {"extra/samples.png", f"extra/{pipeline_dir.parent.name}"}
    assert "pipeline/model_index.json" in {a.path for a in client.list_artifacts(rid, "pipeline")}
    logged_cfg = json.loads(Path(client.download_artifacts(rid, "config.json", str(tmp_path))).read_text())
    assert logged_cfg["debug"]["token"] == "***" and logged_cfg["train"]["lr"] == 0.001

    text = all_strings(client, [rid, *(r.info.run_id for r in kids.values())]) + json.dumps(logged_cfg)
    for secret in ("secret", "hunter2", "alice", TOKEN, "bob:pw", "k-123"):
        assert secret not in text

    # the pyfunc model: loads through MLflow (no o2mkd-specific code) and samples
    import mlflow.pyfunc

    assert model_uri and model_uri.startswith("models:/")
    assert client.get_logged_model(model_uri.split("/", 1)[1]).status == LoggedModelStatus.READY
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # load_model resolves runs:/ with the global tracking URI
    model = mlflow.pyfunc.load_model(f"runs:/{rid}/model")
    images = model.predict({"num_images": 2, "steps": 2, "seed": 3})
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.float32 and 0 <= images.min() <= images.max() <= 1
    pipe = O2MKDPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="np")
    np.testing.assert_allclose(images, ref.images, atol=1e-6)

    # a rerun of the same --out after a failure continues the same MLflow runs (resume)
    client.set_terminated(rid, "FAILED")
    again = RunTracker(uri)
    assert again.start(cfg, out) == rid
    feed(again, steps=(40,), segments=(0,))
    again.finish("FINISHED")
    seg0 = children(client, run)["seg-00"].info.run_id
    assert [m.step for m in client.get_metric_history(seg0, "loss")] == [10, 20, 30, 40]
    assert again.not_logged == [] and client.get_run(rid).info.status == "FINISHED"

    # nested under an existing run (a Tune experiment's run): the trial's run is its child
    trial = RunTracker(uri, parent_run_id=rid)
    trial_id = trial.start(cfg, tmp_path / "runs" / "trial-0")
    trial.finish()
    assert client.get_run(trial_id).data.tags["mlflow.parentRunId"] == rid and trial_id != rid


# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    t0 = time.time()
    url, proc = start_mlflow_server(root)
    print(f"mlflow server answered /health after {time.time() - t0:.1f} s")
    yield url, root
    stop_mlflow_server(proc)


def test_remote_server(mlflow_server, tmp_path, pipeline_dir):
    url, root = mlflow_server
    # correctness against a real server; generous timeouts so that a busy CI machine does not turn this into
    # a resilience test (those are below)
    tracker = RunTracker(url, http_timeout_s=30, max_call_s=60)
    rid = tracker.start(make_cfg(), tmp_path / "out", tags={"trial": "7"})
    assert rid, tracker.not_logged
    feed(tracker)
    extra = tmp_path / "report.json"
    extra.write_text("{}")
    tracker.log_artifacts(extra)
    model_uri = tracker.log_pipeline(pipeline_dir)
    tracker.finish()
    assert tracker.not_logged == [] and model_uri

    client = MlflowClient(url)  # an independent client sees everything
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == "64"
    assert run.data.tags["trial"] == "7" and run.data.params["ray.address"] == "ray://head:10001"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied through the server
    kids = children(client, run)
    assert sorted(kids) == ["seg-00", "seg-01"]
    hist = client.get_metric_history(kids["seg-01"].info.run_id, "loss")
    assert [m.step for m in hist] == [10, 20, 30]
    assert {a.path for a in client.list_artifacts(rid)} >= {"config.json", "report.json", "pipeline"}
    assert "pipeline/model_index.json" in {a.path for a in client.list_artifacts(rid, "pipeline")}
    assert list((root / "mlartifacts").rglob("model_index.json"))  # landed in the server's destination
    model = client.get_logged_model(model_uri.split("/", 1)[1])
    assert model.source_run_id == rid and model.status == LoggedModelStatus.READY
    assert "MLmodel" in {a.path for a in client.list_logged_model_artifacts(model.model_id)}


# --------------------------------------------------------------------------------------------------------------


def _lost_run_checks(tracker: RunTracker, elapsed: float, bound: float) -> None:
    assert tracker.run_id is None and elapsed < bound, (elapsed, tracker.not_logged)
    lost = "\n".join(tracker.not_logged)
    assert "parent run" in lost and "seg-00: 15 metric values (steps 10-30)" in lost
    assert "seg-01: 15 metric values" in lost and "pipeline" in lost
    for k in HTTP_ENV:  # MLflow's HTTP settings were scoped to the tracker's calls
        assert os.environ.get(k) == ORIG_ENV.get(k)


ORIG_ENV = {k: os.environ.get(k) for k in HTTP_ENV}


def test_dead_server_does_not_block(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    tracker = RunTracker(url, cooldown_s=60)
    t0 = time.time()
    assert tracker.start(make_cfg(), tmp_path / "out") is None
    start_s = time.time() - t0
    feed(tracker)  # buffered, then skipped during the cooldown: no waiting per report
    tracker.log_pipeline(tmp_path / "missing")
    tracker.finish("FAILED")
    elapsed = time.time() - t0
    print(f"dead server: start {start_s:.1f} s, whole run {elapsed:.1f} s")
    assert start_s < 10
    _lost_run_checks(tracker, elapsed, 25)


def test_hung_server_is_bounded(tmp_path):
    # accepts connections (kernel backlog) but never answers: each call is bounded by the timeout budget
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        tracker = RunTracker(f"http://127.0.0.1:{sock.getsockname()[1]}", max_call_s=4, http_timeout_s=2,
                             cooldown_s=60)
        t0 = time.time()
        assert tracker.start(make_cfg(), tmp_path / "out") is None
        start_s = time.time() - t0
        feed(tracker)
        tracker.log_pipeline(tmp_path / "missing")
        tracker.finish("FAILED")
        elapsed = time.time() - t0
        print(f"hung server: start {start_s:.1f} s, whole run {elapsed:.1f} s")
        assert start_s < 4 + 1.5  # max_call_s, plus slack for a busy machine
        _lost_run_checks(tracker, elapsed, 2 * (4 + 1.5))  # start + the last try in finish
    finally:
        sock.close()
