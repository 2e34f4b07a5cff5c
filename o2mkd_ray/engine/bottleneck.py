"""Was the teacher the bottleneck? report.json's ``bottleneck``: the teacher replicas' utilisation, the share of the
students' step time spent waiting for the teacher, and, when the teacher held training back, one line of advice
computed from the costs measured in this run.

Definitions (all measured in this run's last training attempt):
  * utilisation of a replica: the time at least one of its forwards ran, over the training wall time;
  * wait share of a segment: the time its workers' steps spent in ``teacher.result`` over the steps' time;
  * the teacher is the bottleneck when the replicas' mean utilisation exceeds :data:`UTILISATION_LIMIT` *and* the
    segments' mean wait share exceeds :data:`WAIT_LIMIT`: it is busy almost all the time and the students spend
    most of each step waiting for it. A busy teacher whose students seldom wait is well used, not a bottleneck;
    students that wait on an idle teacher wait on something else (the network, the batching wait).
  * replicas that would balance it: the requests per second the workers would send if they never waited (one per
    step: workers / own step time, summed over segments) times the teacher's busy time per request, rounded up.
"""

from __future__ import annotations

import math

UTILISATION_LIMIT = 0.9
WAIT_LIMIT = 0.5


def teacher_load(teacher: dict, summaries: dict[int, dict]) -> dict:
    """report.json's ``bottleneck`` from the teacher's counters and this run's segment summaries.

    Args:
        teacher: :func:`o2mkd_ray.engine.teacher_service.teacher_stats` (with ``per_replica`` utilisations).
        summaries: ``{segment: summary}`` of the segments trained in this run (``train_s``, ``teacher_wait_share``,
            ``steps``, ``resumed_from``, ``workers``).
    Returns:
        ``{}`` without teacher actors or trained segments; else ``teacher_utilisation`` (mean, and per replica),
        ``teacher_wait_share`` (mean, and per segment), ``teacher_s_per_request``, ``student_step_s`` (per
        segment, waits excluded), ``replicas_to_balance``, ``teacher_bound`` and ``advice`` (one line, or None).
    """
    live = [r for r in teacher.get("per_replica", []) if not r.get("lost") and "utilisation" in r]
    segs = {k: s for k, s in summaries.items() if s.get("train_s") and s.get("teacher_wait_share") is not None}
    if not live or not segs:
        return {}
    util = sum(r["utilisation"] for r in live) / len(live)
    wait = sum(s["teacher_wait_share"] * s["train_s"] for s in segs.values()) / sum(s["train_s"] for s in segs.values())
    served = sum(r["requests"] for r in live)
    per_request = sum(r["busy_wall_s"] for r in live) / max(1, served)
    own_step = {k: s["train_s"] * (1 - s["teacher_wait_share"]) / max(1, s["steps"] - s.get("resumed_from", 0))
                for k, s in segs.items()}
    demand = sum(max(1, len(segs[k].get("workers") or [0])) / max(v, 1e-9) for k, v in own_step.items())
    needed = max(1, math.ceil(demand * per_request))
    bound = util > UTILISATION_LIMIT and wait > WAIT_LIMIT
    advice = None
    if bound:
        advice = (f"the teacher was the bottleneck (utilisation {util:.2f}, students waited {wait:.0%} of each step): "
                  f"about {needed} teacher replica(s) would balance it (teacher {1000 * per_request:.1f} ms per "
                  f"request, students {1000 * sum(own_step.values()) / len(own_step):.1f} ms per step without "
                  f"waiting); set teacher.replicas: {needed}, or per_node on {needed} nodes")
    return {"teacher_utilisation": round(util, 4),
            "teacher_utilisation_per_replica": {r["name"]: r["utilisation"] for r in live},
            "teacher_wait_share": round(wait, 4),
            "teacher_wait_share_per_segment": {f"seg-{k:02d}": round(s["teacher_wait_share"], 4)
                                               for k, s in sorted(segs.items())},
            "teacher_s_per_request": round(per_request, 5),
            "student_step_s": {f"seg-{k:02d}": round(v, 5) for k, v in sorted(own_step.items())},
            "replicas_to_balance": needed, "teacher_bound": bound,
            "limits": {"utilisation": UTILISATION_LIMIT, "wait_share": WAIT_LIMIT}, "advice": advice}


def tracker_metrics(report: dict) -> dict[str, float]:
    """The bottleneck and placement figures of a report as MLflow metrics of the parent run."""
    b, t = report.get("bottleneck") or {}, report.get("teacher") or {}
    m = {f"teacher_utilisation/{name}": v for name, v in b.get("teacher_utilisation_per_replica", {}).items()}
    m |= {f"teacher_wait_share/{seg}": v for seg, v in b.get("teacher_wait_share_per_segment", {}).items()}
    for key in ("teacher_utilisation", "teacher_wait_share", "replicas_to_balance"):
        if key in b:
            m[key] = float(b[key])
    if b:
        m["teacher_bound"] = float(b["teacher_bound"])
    if t.get("node_local_share") is not None:
        m["teacher_node_local_share"] = float(t["node_local_share"])
    return m
