"""Where things run on a multi-node Ray cluster: the node of this process, the nodes the teacher replicas go to,
and how a segment's worker group is placed (``ray.placement``).

``teacher.replicas: per_node`` puts one replica on every alive node that has CPUs or GPUs (a node where train
workers can run; a head started with no CPUs gets none), each pinned to its node (a soft pin was seen to put two
replicas on one node); a replica lost with its node is gone for good and its clients fail over to the others
(``o2mkd_ray.engine.teacher_service.TeacherClient``). A number of replicas is spread over the nodes by Ray, and a
replica of those that is lost with its node is restarted elsewhere (``teacher.max_restarts``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ray

from o2mkd_ray.config.schema import TeacherConfig

log = logging.getLogger(__name__)

# ray.placement -> Ray Train ScalingConfig.placement_strategy (a placement group strategy)
PLACEMENT_STRATEGY = {"spread": "SPREAD", "pack": "PACK"}


def node_of_this_process() -> dict[str, str]:
    """``{"node_id", "node_ip"}`` of the Ray node this process runs on (empty strings outside Ray)."""
    if not ray.is_initialized():
        return {"node_id": "", "node_ip": ""}
    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def replica_nodes(tcfg: TeacherConfig) -> list[str | None]:
    """Per teacher replica, the node id it is pinned to (``per_node``) or None (a number: spread by Ray).

    Raises:
        RuntimeError: ``per_node`` and no alive node has the CPUs/GPUs one replica asks for.
    """
    if tcfg.replicas != "per_node":
        return [None] * tcfg.replicas
    nodes = []
    for n in ray.nodes():
        res = n.get("Resources", {})
        can_train = res.get("CPU", 0) > 0 or res.get("GPU", 0) > 0
        fits = res.get("CPU", 0) >= tcfg.num_cpus and res.get("GPU", 0) >= tcfg.num_gpus
        if n.get("Alive") and can_train and fits:
            nodes.append(n["NodeID"])
    if not nodes:
        raise RuntimeError(f"teacher.replicas: per_node found no node with {tcfg.num_cpus:g} CPU and "
                           f"{tcfg.num_gpus:g} GPU for a replica; lower teacher.num_cpus/num_gpus or add nodes")
    return sorted(nodes)


def scheduling_strategy(node: str | None):
    """The actor scheduling strategy of a replica: pinned to ``node``, or Ray's SPREAD for None; inside a
    placement group (a Tune trial's, which holds a bundle per replica) None: Ray's default keeps it in that group."""
    if node is None:
        return "SPREAD" if ray.util.get_current_placement_group() is None else None
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node, soft=False)


def ledger_placement(storage: str, k: int) -> list[dict]:
    """Segment ``k``'s workers as its rank ledgers (``STORAGE/seg-KK/rank-R.json``, local storage only) saw them:
    per rank, the node of its last report and every node it reported from (a worker moved by a node loss reports
    from two). Empty when there are no ledgers (cloud storage)."""
    workers = []
    for p in sorted(Path(storage).glob(f"seg-{k:02d}/rank-*.json")) if "://" not in storage else []:
        try:
            led = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            log.warning("rank ledger %s unreadable (%s)", p, e)
            continue
        reports = [r for r in led.get("reports", []) if r.get("node_id")]
        if not reports:
            continue
        seen = []
        for r in reports:
            if not seen or seen[-1]["node_id"] != r["node_id"] or seen[-1]["pid"] != r["pid"]:
                seen.append({key: r.get(key) for key in ("node_id", "node_ip", "pid")} | {"from_step": r["step"]})
        workers.append({"rank": led.get("rank"), **{key: reports[-1].get(key) for key in ("node_id", "node_ip", "pid")},
                        "attempts": seen})
    return workers
