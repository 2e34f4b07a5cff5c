"""A distillation across a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``): a head with
no CPUs and worker nodes of one CPU each, the driver connecting through ``ray.address`` as a user's would.

With one whole CPU per segment worker, each segment's worker can only land on a node of its own; the teacher runs
one replica per node (``teacher.replicas: per_node``) and the workers' requests must stay on their node. Then a
worker node is removed from outside (``Cluster.remove_node``) mid-run: the segment that ran there must continue on
the spare node from its last recorded checkpoint while the other segments never restart.

What each test reads: ``report.json`` (each segment's workers and their nodes, each teacher replica's node, the
requests per client node -> replica node), ``OUT/ray/seg-KK/rank-R.json`` (every report of a rank with its pid and
node) and ``checkpoint_manager_snapshot.json`` (the checkpoints Ray Train recorded).
"""

from __future__ import annotations

import json
import shutil
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
SNAPSHOT = "checkpoint_manager_snapshot.json"
WORKER_NODES = 2  # one segment per worker node (segments.n is set to it)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head with 0 CPUs (it hosts the driver's Train controllers, 0-CPU actors) and ``WORKER_NODES`` 1-CPU worker nodes;
    every process of it shut down after the module."""
    import ray
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="o2c-")  # short: Ray's socket paths live under it
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "temp_dir": tmp, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": _free_port()})  # 8265 may be another Ray's on this machine
    try:
        for _ in range(WORKER_NODES):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def _cfg(overrides, address: str, *extra):
    from o2mkd_ray.config.loading import load_config

    return load_config(TINY, [*overrides, f"ray.address={address}", "ray.cpus_per_worker=1", "ray.placement=spread",
                              f"segments.n={WORKER_NODES}",
                              "teacher.replicas=per_node", "teacher.num_cpus=0", *extra])


def _worker_node_ids(c) -> set[str]:
    return {n.node_id for n in c.worker_nodes}


def _seg_dir(out: Path, k: int) -> Path:
    return out / "ray" / f"seg-{k:02d}"


def _ledger(out: Path, k: int, rank: int = 0) -> list[dict]:
    try:
        return json.loads((_seg_dir(out, k) / f"rank-{rank}.json").read_text())["reports"]
    except (OSError, ValueError, KeyError):
        return []


def _recorded(out: Path, k: int) -> int | None:
    try:
        latest = json.loads((_seg_dir(out, k) / SNAPSHOT).read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None
    return int(latest["metrics"]["step"]) if latest else None


def _finished(out: Path, k: int) -> bool:
    return (out / "segments" / f"seg-{k:02d}" / "summary.json").is_file()


def _assert_loadable(out: Path) -> None:
    from o2mkd_ray import O2MKDPipeline

    pipe = O2MKDPipeline.from_pretrained(out / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=2,
               output_type="np").images
    assert img.shape == (1, 8, 8, 1) and np.isfinite(img).all()


def _placement(report: dict) -> tuple[dict, dict]:
    """``{segment: [node id per rank]}`` and ``{replica name: node id}`` as report.json gives them."""
    segs = {s["index"]: [w["node_id"] for w in s["workers"]] for s in report["segments"]}
    reps = {r["name"]: r.get("node_id") for r in report["teacher"]["per_replica"]}
    return segs, reps


def test_segments_spread_over_nodes_and_teacher_requests_stay_node_local(cluster, tiny_overrides, tmp_path):
    from o2mkd_ray.engine.driver import run_distillation

    cfg = _cfg(tiny_overrides, cluster.address, "train.steps=20", "train.checkpoint_every=10")
    out = tmp_path / "run"
    report = run_distillation(cfg, out, progress=False)
    nodes = _worker_node_ids(cluster)
    segs, reps = _placement(json.loads((out / "report.json").read_text()))
    # one worker per segment, each on a worker node of its own (1 CPU per node, 1 CPU per worker)
    assert all(len(v) == 1 for v in segs.values()) and len(segs) == WORKER_NODES
    assert {v[0] for v in segs.values()} == nodes, (segs, nodes)
    assert all(w["node_ip"] for s in report["segments"] for w in s["workers"])
    for k in range(WORKER_NODES):  # the rank ledger names the same node at every report
        assert {r["node_id"] for r in _ledger(out, k)} == set(segs[k])
    # one teacher replica per node that can train (the 0-CPU head gets none)
    assert sorted(reps.values()) == sorted(nodes), reps
    t = report["teacher"]
    assert t["replicas"] == WORKER_NODES and all(r["requests"] > 0 for r in t["per_replica"])
    # every worker's request went to the replica on its own node
    assert t["node_local_share"] == 1.0, t["requests_by_node"]
    assert all(a == b for route in t["requests_by_node"] for a, b in [route.split(" -> ")])
    assert sum(t["requests_by_node"].values()) == sum(t["requests_by_segment"].values())
    _assert_loadable(out)
    print(f"placement: segments {segs}; replicas {reps}; node-local share {t['node_local_share']}; "
          f"requests by node {t['requests_by_node']}")


class _Thread(threading.Thread):
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


def _wait_for(what: str, cond, alive):
    """Polls ``cond()`` until truthy; fails once the run ended without it. No clock."""
    while True:
        v = cond()
        if v:
            return v
        assert alive(), f"the run ended before {what}"
        time.sleep(0.1)


def test_node_removed_mid_run_its_segment_moves_and_resumes_the_others_never_restart(cluster, tiny_overrides,
                                                                                    tmp_path):
    """A spare 1-CPU node is added; once segment 1 has a recorded checkpoint, its node is removed (processes
    killed, no grace). Ray Train (``ray.max_failures`` 2) restarts segment 1's worker group on a live node (the spare,
    or one a finished segment freed) from its last recorded checkpoint; the teacher replica pinned to the removed
    node is gone, and its clients (the moved worker) use the replica on their new node."""
    import ray

    from o2mkd_ray.engine.driver import run_distillation, teacher_run_id
    from o2mkd_ray.engine.teacher_service import actor_names

    spare = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    steps, every, victim = 80, 10, 1
    cfg = _cfg(tiny_overrides, cluster.address, f"train.steps={steps}", f"train.checkpoint_every={every}")
    assert cfg.ray.max_failures >= 1
    out = tmp_path / "run"
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)  # the test's own handle
    run = _Thread(lambda: run_distillation(cfg, out, progress=False))
    run.start()

    def moment():  # every segment reported (so its node is known), segment 1 has a recorded checkpoint
        ready = all(_ledger(out, k) for k in range(WORKER_NODES)) and _recorded(out, victim) and not _finished(
            out, victim)
        return ready and _ledger(out, victim)[-1]["node_id"]

    victim_node_id = _wait_for("segment 1's first recorded checkpoint", moment, run.is_alive)
    before = {k: _ledger(out, k) for k in range(WORKER_NODES)}
    recorded = _recorded(out, victim)
    # the replica on the victim's node served only segment 1: one request per step (+1 prefetched, + validation)
    names = actor_names(teacher_run_id(out), WORKER_NODES + 1)
    local = [n for n in names if ray.get(ray.get_actor(n).ready.remote())["node_id"] == victim_node_id]
    assert len(local) == 1
    served = ray.get(ray.get_actor(local[0]).get_stats.remote())["by_client"].get(f"seg-{victim:02d}", 0)
    cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == victim_node_id), allow_graceful=False)
    at_loss = served - 1 - cfg.train.val_batches

    report = run.value()
    segs = {s["index"]: s for s in report["segments"]}
    hist = json.loads((out / "history.json").read_text())
    assert [segs[k]["steps"] for k in range(WORKER_NODES)] == [steps] * WORKER_NODES
    resumed = segs[victim]["resumed_from"]
    assert resumed >= recorded > 0 and resumed < steps, (resumed, recorded)
    assert [m["step"] for m in hist[str(victim)]] == list(range(resumed + every, steps + 1, every))
    # segment 1 went on on another live node (the spare one, or one a finished segment freed), in a new process
    (moved,) = [w["node_id"] for w in segs[victim]["workers"]]
    assert moved != victim_node_id and moved in _worker_node_ids(cluster)
    attempts = segs[victim]["workers"][0]["attempts"]
    assert [a["node_id"] for a in attempts] == [victim_node_id, moved], attempts
    assert attempts[0]["pid"] != attempts[1]["pid"] and attempts[1]["from_step"] == resumed + every
    for k in set(range(WORKER_NODES)) - {victim}:  # the others never restarted: one process, one node, every report from the first step
        led = _ledger(out, k)
        assert segs[k]["resumed_from"] == 0 and len(segs[k]["workers"][0]["attempts"]) == 1
        assert len({r["pid"] for r in led}) == 1 and len({r["node_id"] for r in led}) == 1
        assert led[: len(before[k])] == before[k]
        assert [m["step"] for m in hist[str(k)]] == list(range(every, steps + 1, every))
    # the replica pinned to the removed node is gone; the others served on, and the moved segment's requests went
    # to the replica of its new node
    t = report["teacher"]
    assert [r["name"] for r in t["per_replica"] if r.get("lost")] == local, t["per_replica"]
    # every surviving replica on a node where a segment trained served it (a spare node's replica may serve none)
    used = {a["node_id"] for k in range(WORKER_NODES) for a in segs[k]["workers"][0]["attempts"]} - {victim_node_id}
    assert all(r["requests"] > 0 for r in t["per_replica"] if not r.get("lost") and r["node_id"] in used)
    assert any(route == f"{moved} -> {moved}" for route in t["requests_by_node"]), t["requests_by_node"]
    assert t["node_local_share"] == 1.0, t["requests_by_node"]
    _assert_loadable(out)
    print(f"node loss: segment {victim} on node {victim_node_id[:8]} removed at about step {at_loss}; recorded "
          f"checkpoint then {recorded}; resumed from {resumed} on node {moved[:8]} (spare {spare.node_id[:8]}): "
          f"{at_loss - resumed} steps lost; replica {local[0]} lost with the node; node-local share "
          f"{t['node_local_share']}; requests by node {t['requests_by_node']}")
