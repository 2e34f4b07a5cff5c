"""``ray.storage_path: s3://...`` end to end against a real S3-compatible server on 127.0.0.1 (moto in server mode,
started here, with IAM authentication on: a request without the right keys is refused).

The endpoint and credentials are given the way a user gives them: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY`` in the driver's environment (or ``?endpoint_override=`` in the URI). The end-to-end test
runs the driver against a Ray cluster whose processes were started WITHOUT those variables, so the workers can only
write their checkpoints if the driver forwards them to its job.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

TINY = ROOT / "pipelines" / "tiny.yaml"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
BUCKET = "o2mkd-ckpt"
# moto skips authentication for this many requests (the IAM set-up below), then checks every request's keys
SETUP_REQUESTS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen) -> None:
    """Waits (on the server's own start, not a clock) until it accepts connections; fails if it exits."""
    while True:
        assert proc.poll() is None, "moto server exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with authentication on, an IAM user allowed ``s3:*``, its keys and a bucket.

    Yields ``{"endpoint", "key", "secret", "env"}`` (``env``: what a user exports)."""
    import boto3

    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - open while the server runs
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(SETUP_REQUESTS)},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        anon = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
                "aws_secret_access_key": "setup"}
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="o2mkd")
        iam.put_user_policy(UserName="o2mkd", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="o2mkd")["AccessKey"]
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key["AccessKeyId"],
                          aws_secret_access_key=key["SecretAccessKey"])
        s3.create_bucket(Bucket=BUCKET)
        env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"], "AWS_DEFAULT_REGION": "us-east-1"}
        yield {"endpoint": endpoint, "s3": s3, "env": env}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def user_env(moto_s3, monkeypatch):
    """This process's environment as a user sets it for the moto server."""
    for k, v in moto_s3["env"].items():
        monkeypatch.setenv(k, v)
    return moto_s3["env"]


def _keys(s3, prefix: str) -> list[str]:
    keys, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


# ----------------------------------------------------------------------------------------------------------------
# where a run's checkpoints go, what the driver forwards


def test_run_storage_is_a_folder_of_its_own_under_the_storage_path(tmp_path):
    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.engine.storage import display_storage, join_storage, run_storage

    cfg = load_config(TINY, [])
    assert run_storage(cfg, tmp_path / "a") == str(tmp_path / "a" / "ray")
    cfg = load_config(TINY, ["ray.storage_path=s3://b/runs?endpoint_override=http://127.0.0.1:9"])
    a, b = run_storage(cfg, tmp_path / "a"), run_storage(cfg, tmp_path / "b")
    assert a.startswith("s3://b/runs/tiny-") and a.endswith("?endpoint_override=http://127.0.0.1:9")
    assert a != b and a == run_storage(cfg, tmp_path / "a")  # one folder per --out; the same again to resume
    assert join_storage("s3://b/p/?region=x", "t", "1") == "s3://b/p/t/1?region=x"
    assert join_storage("/shared/ray", "t") == "/shared/ray/t"
    assert display_storage("s3://KEY:SECRET@b/p?endpoint_override=http://h:1") == "s3://b/p"


def test_storage_env_is_the_storage_client_variables_only():
    from o2mkd_ray.engine.storage import storage_env

    env = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "http://h:1", "HOME": "/h",
           "GOOGLE_APPLICATION_CREDENTIALS": "/c.json", "PATH": "/bin"}
    assert storage_env(env) == {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                    "AWS_ENDPOINT_URL", "GOOGLE_APPLICATION_CREDENTIALS")}


# ----------------------------------------------------------------------------------------------------------------
# the pre-flight: one line before any Ray work


def test_preflight_accepts_a_usable_bucket_by_env_var_or_uri_endpoint(moto_s3, user_env, monkeypatch):
    from o2mkd_ray.engine.storage import check_storage

    check_storage(f"s3://{BUCKET}/runs")  # AWS_ENDPOINT_URL from the environment
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    check_storage(f"s3://{BUCKET}/runs?endpoint_override={moto_s3['endpoint']}")  # the endpoint in the URI
    assert not [k for k in _keys(moto_s3["s3"], "runs/") if ".o2mkd-probe-" in k]  # the probe is cleaned up


@pytest.mark.parametrize("case", ["no_bucket", "unreachable", "wrong_keys"])
def test_preflight_names_what_to_fix_in_one_line(moto_s3, user_env, monkeypatch, case):
    from o2mkd_ray.engine.storage import check_storage
    from o2mkd_ray.errors import ConfigError

    path, needle = f"s3://{BUCKET}/runs", None
    if case == "no_bucket":
        path, needle = "s3://no-such-bucket/runs", "bucket 'no-such-bucket' of 's3://no-such-bucket/runs' does not exist"
    elif case == "unreachable":
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
        needle = "cannot reach the S3 endpoint http://127.0.0.1:"
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        needle = "check the"
    with pytest.raises(ConfigError) as e:
        check_storage(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ray.storage_path: ") and needle in msg, msg
    if case == "wrong_keys":
        assert "credentials" in msg, msg


def test_cli_refuses_a_missing_bucket_before_ray_starts(moto_s3, user_env, tiny_overrides, tmp_path, capsys):
    from o2mkd_ray.cli.main import main

    out = tmp_path / "run"
    rc = main(["distill", str(TINY), "--out", str(out), *[a for o in tiny_overrides for a in ("--set", o)],
               "--set", "ray.storage_path=s3://missing-bucket/runs"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "bucket 'missing-bucket'" in lines[0] and "does not exist" in lines[0], err
    assert not out.exists()  # nothing written, nothing started


# ----------------------------------------------------------------------------------------------------------------
# end to end: checkpoints in S3, the driver SIGKILLed, the same command resumes from S3


def _recorded(s3, prefix: str, k: int) -> int | None:
    """The step of the latest checkpoint Ray Train recorded for segment ``k`` in its snapshot in the bucket."""
    try:
        body = s3.get_object(Bucket=BUCKET, Key=f"{prefix}/seg-{k:02d}/{SNAPSHOT}")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    latest = json.loads(body).get("latest_checkpoint_result")
    return int(latest["metrics"]["step"]) if latest else None


def _checkpoint_steps(s3, prefix: str, k: int) -> set[int]:
    """The steps of segment ``k``'s checkpoint folders in the bucket (their manifest is the last file written)."""
    steps = set()
    for key in _keys(s3, f"{prefix}/seg-{k:02d}/checkpoint_"):
        if key.endswith("/manifest.json"):
            steps.add(int(json.loads(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())["step"]))
    return steps


def _summary(out: Path, k: int) -> bytes | None:
    f = out / "segments" / f"seg-{k:02d}" / "summary.json"
    return f.read_bytes() if f.is_file() else None


def _driver(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "o2mkd_ray.cli", *args], env=env, cwd=str(ROOT), stdout=f,
                                stderr=subprocess.STDOUT)


@pytest.mark.ray
@pytest.mark.slow
def test_checkpoints_go_to_s3_and_a_sigkilled_driver_resumes_from_them(moto_s3, tiny_overrides, tmp_path,
                                                                        monkeypatch):
    """A Ray cluster (its processes started without any AWS variable), a driver connected to it with the user's
    AWS_* variables and ``ray.storage_path: s3://BUCKET/runs``: once every segment has a checkpoint recorded in the
    bucket, the test SIGKILLs the driver, then runs the same command again. Every segment resumes from a
    checkpoint in the bucket, at or after the one recorded at the kill; the pipeline lands in the local --out."""
    from ray.cluster_utils import Cluster

    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.engine.storage import run_storage

    s3, steps, every, n = moto_s3["s3"], 60, 10, 1  # one segment: what it proves holds per segment
    ray_tmp = tempfile.mkdtemp(prefix="o2r-s3-")  # short: Ray's socket paths; holds the cluster's address file
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)  # Cluster writes its address file under RAY_TMPDIR/ray, not /tmp/ray
    os.makedirs(os.path.join(ray_tmp, "ray"))
    for k in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(k)  # the cluster's processes inherit this environment: no storage credentials in it
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "temp_dir": ray_tmp, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": _free_port()})
    out = tmp_path / "run"
    storage = f"s3://{BUCKET}/runs"
    sets = [*tiny_overrides, f"segments.n={n}", f"train.steps={steps}", f"train.checkpoint_every={every}",
            f"ray.storage_path={storage}"]
    args = ["distill", str(TINY), "--out", str(out), "--no-eval", *[a for o in sets for a in ("--set", o)]]
    env = {**os.environ, **moto_s3["env"], "RAY_ADDRESS": cluster.address}
    prefix = run_storage(load_config(TINY, sets), out).removeprefix(f"s3://{BUCKET}/")
    driver = rerun = None
    try:
        driver = _driver(args, env, tmp_path / "killed.log")
        while not all(_recorded(s3, prefix, k) for k in range(n)):  # every segment has a recorded checkpoint
            assert driver.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.2)
        at_kill = {k: _recorded(s3, prefix, k) for k in range(n)}
        os.kill(driver.pid, signal.SIGKILL)
        assert driver.wait() == -signal.SIGKILL
        done = {k: _summary(out, k) for k in range(n) if _summary(out, k) is not None}  # finished before the kill
        assert len(done) < n, "every segment finished before the kill: the test's run is too short"
        assert not (out / "ray").exists()  # nothing of Ray Train's went to the local folder
        rerun = _driver(args, env, tmp_path / "rerun.log")
        assert rerun.wait() == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    finally:
        for p in (driver, rerun):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        cluster.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    rep = json.loads((out / "report.json").read_text())
    hist = json.loads((out / "history.json").read_text())
    segs = {s["index"]: s for s in rep["segments"]}
    in_bucket = {k: _checkpoint_steps(s3, prefix, k) for k in range(n)}
    for k in range(n):
        resumed = segs[k]["resumed_from"]
        assert segs[k]["steps"] == steps
        assert [m["step"] for m in hist[str(k)]] == list(range(resumed + every, steps + 1, every))
        if k in done:  # finished before the kill: kept, not trained again
            assert resumed == 0 and _summary(out, k) == done[k]
            continue
        assert at_kill[k] <= resumed < steps, (k, resumed, at_kill)  # nothing recorded at the kill was redone
        assert steps in in_bucket[k], (k, in_bucket[k])  # the rerun's checkpoints went to the bucket too
        assert segs[k]["checkpoint"].startswith(f"s3://{BUCKET}/{prefix}/seg-{k:02d}/checkpoint_"), segs[k]
    assert not (out / "ray").exists()

    from o2mkd_ray import O2MKDPipeline

    pipe = O2MKDPipeline.from_pretrained(out / "pipeline")  # exported to the local --out
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
               output_type="np").images
    assert img.shape == (1, 8, 8, 1) and np.isfinite(img).all()
    print(f"S3 resume: finished before the kill {sorted(done)}; recorded at the kill {at_kill}; resumed from "
          f"{ {k: segs[k]['resumed_from'] for k in range(n)} }; checkpoint steps in the bucket {in_bucket}")
