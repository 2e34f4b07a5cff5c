"""The shared teacher served as named Ray actor(s), and the client that train workers call.

The server actor loads the teacher once and answers ``predict(x_t, t, features)`` under ``no_grad``. Requests that
arrive together (from different segments' workers) are merged into one forward of at most ``max_batch`` samples,
waiting at most ``max_wait_ms`` for company; ``max_concurrency`` forwards may run at once (on a 2-core CPU, 2
concurrent forwards served most samples/s: 207 vs 122-127 with one). ``max_restarts`` brings a crashed server back; the client retries.
The server counts ``multi_client_forwards``: forwards that merged requests of two or more clients (segments),
the time at least one forward ran (``busy_wall_s``, for utilisation) and its requests per client node (``by_node``).

On a cluster the replicas are spread over nodes (:func:`o2mkd_ray.engine.placement.replica_nodes`) and a client
calls the replica on its own node when there is one, failing over to the others when a call to it fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch

from o2mkd_ray.config.schema import Config, TeacherConfig
from o2mkd_ray.core.conditioning import cond_cat, cond_key, cond_map, to_numpy, to_torch
from o2mkd_ray.engine.faults import teacher_hook
from o2mkd_ray.engine.placement import node_of_this_process, replica_nodes, scheduling_strategy

log = logging.getLogger(__name__)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def actor_names(run_id: str, replicas: int) -> list[str]:
    """The names of a run's teacher actors (``run_id``: ``o2mkd_ray.engine.driver.teacher_run_id``)."""
    return [f"o2mkd-teacher-{run_id}-{r}" for r in range(replicas)]


class _Server:
    """Body of the teacher actor (a plain class, wrapped by ``ray.remote`` in :func:`start_teacher`)."""

    def __init__(self, teacher_cfg: dict, feature_blocks: list[str] | None, max_batch: int, max_wait_ms: float,
                 max_concurrency: int, fault: dict | None = None):
        from o2mkd_ray.config.loading import build_section
        from o2mkd_ray.core.teacher import TeacherFn, load_teacher

        tcfg = build_section(TeacherConfig, teacher_cfg)
        model, _ = load_teacher(tcfg)
        device = "cuda" if torch.cuda.is_available() and tcfg.num_gpus > 0 else "cpu"
        model.to(device)
        dtype = _DTYPES[tcfg.dtype] if device == "cuda" else torch.float32
        self.fn = TeacherFn(model, feature_blocks, dtype=dtype)
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency)
        self.queue: list = []
        self.max_concurrency = max_concurrency
        self._drainers = 0
        self.stats = {"requests": 0, "samples": 0, "forwards": 0, "busy_s": 0.0, "started_at": time.time(),
                      "pid": os.getpid(), "multi_client_forwards": 0, "busy_wall_s": 0.0, **node_of_this_process()}
        self._busy_lock = threading.Lock()
        self._running, self._busy_since = 0, 0.0  # forwards running now; when the current busy stretch began
        self.by_client: dict[str, int] = {}
        self.by_node: dict[str, int] = {}  # requests per client node id
        self.on_request = teacher_hook(fault)  # test-only fault drill (debug.kill_teacher_after_requests) or None

    def ready(self) -> dict:
        return {"pid": os.getpid(), "blocks": self.fn.blocks, **node_of_this_process()}

    def feature_channels(self, shape: tuple[int, int, int]) -> dict[str, int]:
        return self.fn.feature_channels(tuple(shape))

    def get_stats(self) -> dict:
        s = dict(self.stats)
        s["mean_batch"] = s["requests"] / max(1, s["forwards"])  # requests merged per forward
        s["mean_batch_samples"] = s["samples"] / max(1, s["forwards"])
        s["by_client"] = dict(self.by_client)
        s["by_node"] = dict(self.by_node)
        with self._busy_lock:  # a forward running now counts up to now
            s["busy_wall_s"] += time.perf_counter() - self._busy_since if self._running else 0.0
        return s

    def _forward(self, x: np.ndarray, t: np.ndarray, features: bool, cond: np.ndarray | None = None):
        t0 = time.perf_counter()
        with self._busy_lock:
            if self._running == 0:
                self._busy_since = t0
            self._running += 1
        eps, feats = self.fn(torch.from_numpy(x), torch.from_numpy(t), features=features,
                             cond=to_torch(cond))
        out = (eps.cpu().numpy(), {k: v.cpu().numpy() for k, v in feats.items()} if feats else None)
        with self._busy_lock:
            t1 = time.perf_counter()
            self.stats["busy_s"] += t1 - t0
            self.stats["forwards"] += 1
            self._running -= 1
            if self._running == 0:  # utilisation counts time with any forward running, not forward-seconds
                self.stats["busy_wall_s"] += t1 - self._busy_since
        return out

    async def predict(self, x_t: np.ndarray, t: np.ndarray, features: bool = False, client: str = "",
                      cond: np.ndarray | dict | None = None, node: str = ""):
        """``x_t: (B, C, H, W)``, ``t: (B,)``, ``cond``: a conditional teacher's condition as numpy (text
        embeddings ``(B, L, D)``, or a dict with SDXL's ``text_embeds`` / ``time_ids``) →
        ``(eps_T, feats_T | None)`` numpy. ``node``: the caller's node id (counted in ``by_node``)."""
        self.stats["requests"] += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
        self.by_node[node] = self.by_node.get(node, 0) + 1
        self.stats["samples"] += int(x_t.shape[0])
        if self.on_request is not None:
            self.on_request(self.stats["requests"])
        fut = asyncio.get_running_loop().create_future()
        self.queue.append((np.asarray(x_t), np.asarray(t), bool(features), fut,
                           cond_map(cond, np.asarray), client))
        if self._drainers < self.max_concurrency:  # a free forward slot: start a drainer for it
            self._drainers += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self):
        # Dynamic batching: wait max_wait for company, then keep taking everything queued (up to max_batch
        # samples) each time this slot's previous forward ends. Under load requests pile up while forwards
        # run, so batches grow by themselves; when idle, latency costs at most max_wait.
        try:
            await asyncio.sleep(self.max_wait)
            while self.queue:
                take, n = [], 0
                # one forward takes requests of one kind (with / without text embeddings) and one text length
                while self.queue and (not take or (n + self.queue[0][0].shape[0] <= self.max_batch
                                                   and cond_key(self.queue[0][4]) == cond_key(take[0][4]))):
                    item = self.queue.pop(0)
                    take.append(item)
                    n += item[0].shape[0]
                x = np.concatenate([q[0] for q in take])  # (sum B, C, H, W)
                t = np.concatenate([q[1] for q in take])
                feats = any(q[2] for q in take)
                cond = cond_cat([q[4] for q in take])  # (sum B, L, D) (+ SDXL's added conditions)
                try:
                    eps, fts = await asyncio.get_running_loop().run_in_executor(self.pool, self._forward, x, t, feats,
                                                                                cond)
                except Exception as e:  # noqa: BLE001 - hand the error to every caller of this batch
                    for q in take:
                        q[3].set_exception(e)
                    continue
                if len({q[5] for q in take}) > 1:  # one forward for several clients (segments)
                    self.stats["multi_client_forwards"] += 1
                i = 0
                for xq, _, fq, fut, *_ in take:
                    j = i + xq.shape[0]
                    fut.set_result((eps[i:j], {k: v[i:j] for k, v in fts.items()} if (fq and fts) else None))
                    i = j
        finally:
            self._drainers -= 1


def start_teacher(tcfg: TeacherConfig, run_id: str, feature_blocks: list[str] | None,
                  fault: dict | None = None, nodes: list[str | None] | None = None) -> list:
    """Starts the teacher's named actors (or reuses live ones with those names): one per entry of ``nodes``.

    Args:
        tcfg: the teacher config (model, replicas, resources, batching).
        run_id: the run's id in the actor names (:func:`actor_names`).
        feature_blocks: teacher blocks whose features requests may ask for (None: none).
        fault: a test-only fault spec (``o2mkd_ray.engine.faults.teacher_fault``).
        nodes: per replica, the node id it is pinned to or None (spread by Ray); default
            :func:`o2mkd_ray.engine.placement.replica_nodes`.
    Returns:
        The actors' handles, once every actor answered ``ready``.
    """
    cls = ray.remote(_Server)
    handles = []
    nodes = replica_nodes(tcfg) if nodes is None else nodes
    for name, node in zip(actor_names(run_id, len(nodes)), nodes):
        try:
            handles.append(ray.get_actor(name))
            continue
        except ValueError:
            pass
        h = cls.options(
            name=name,
            num_cpus=tcfg.num_cpus,
            num_gpus=tcfg.num_gpus,
            max_restarts=tcfg.max_restarts,
            max_task_retries=3,
            max_concurrency=1000,  # async actor: requests queue here and are merged into batches
            lifetime=None,
            scheduling_strategy=scheduling_strategy(node),
        ).remote(
            {k: v for k, v in tcfg.__dict__.items()},
            feature_blocks,
            tcfg.max_batch,
            tcfg.max_wait_ms,
            tcfg.max_concurrency,
            fault,
        )
        handles.append(h)
    ray.get([h.ready.remote() for h in handles])
    return handles


class _NotRegistered(RuntimeError):
    """The named teacher actor is not registered (yet)."""


class TeacherClient:
    """The worker-side callable for the teacher actors: ``(x_t, t, features) -> (eps, feats)`` as torch tensors.

    ``submit`` issues the request and returns at once, so the next batch's targets are computed while the
    student trains on the current one; ``result`` waits (retrying on a restarting actor).

    Routing: with ``replica_nodes`` (``{name: node id}``) the client calls a replica on its own node when there is
    one, else any; a replica whose call failed is avoided (the request fails over to another) until every replica
    has failed, when all are tried again (a restarted actor comes back under its name).
    """

    def __init__(self, names: list[str], seed: int = 0, retries: int = 20, client: str = "",
                 replica_nodes: dict[str, str] | None = None, node: str | None = None):
        self.names = list(names)
        self.client = client
        self.rng = random.Random(seed)
        self.retries = retries
        self._handles: dict[str, object] = {}
        self.latency_s = 0.0
        self.calls = 0
        self.node = node if node is not None else (node_of_this_process()["node_id"] if replica_nodes else "")
        self.local = [n for n in self.names if (replica_nodes or {}).get(n) == self.node and self.node]
        self.down: set[str] = set()  # replicas whose last call failed

    def _handle(self, name: str):
        if name not in self._handles:
            try:
                self._handles[name] = ray.get_actor(name)
            except ValueError as e:  # not (re)registered yet
                raise _NotRegistered(str(e)) from None
        return self._handles[name]

    def pick(self) -> str:
        """The replica for the next request: a live one on this node, else a live one anywhere, else any."""
        up = [n for n in self.local if n not in self.down] or [n for n in self.names if n not in self.down]
        if not up:
            self.down.clear()
            up = self.local or self.names
        return self.rng.choice(up)  # spreads load over replicas when several qualify

    def _send(self, name: str, args: tuple):
        return self._handle(name).predict.remote(*args, node=self.node)

    def submit(self, x_t: torch.Tensor, t: torch.Tensor, features: bool = False, cond: torch.Tensor | None = None):
        name = self.pick()
        args = (x_t.detach().cpu().numpy(), t.detach().cpu().numpy(), features, self.client,
                to_numpy(cond))
        try:
            ref = self._send(name, args)
        except _NotRegistered:
            ref = None  # result() retries
        return (name, args, ref, time.perf_counter())

    def result(self, pending) -> tuple[torch.Tensor, dict | None]:
        name, args, ref, t0 = pending
        for attempt in range(self.retries + 1):
            try:
                if ref is None:
                    ref = self._send(name, args)
                eps, feats = ray.get(ref)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, _NotRegistered) as e:
                if attempt == self.retries:
                    raise
                self.down.add(name)
                self._handles.pop(name, None)
                failed, name, ref = name, self.pick(), None  # fail over to another replica when one is up
                log.warning("teacher %s unavailable (%s); retrying on %s", failed, type(e).__name__, name)
                if name == failed or name in self.down:
                    time.sleep(min(2.0, 0.2 * (attempt + 1)))
        self.latency_s += time.perf_counter() - t0
        self.calls += 1
        to_t = lambda a: torch.from_numpy(np.array(a))  # copy: object-store arrays are read-only  # noqa: E731
        return to_t(eps), ({k: to_t(v) for k, v in feats.items()} if feats else None)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, features: bool = False, cond: torch.Tensor | None = None):
        return self.result(self.submit(x_t, t, features, cond))


def stop_teacher(handles: list) -> None:
    """Kills the teacher actors (each at most once; an actor already gone is fine)."""
    for h in handles:
        try:
            ray.kill(h)
        except Exception:  # noqa: BLE001 - shutting down: nothing to save
            pass


def _replica_stats(handle, name: str) -> dict:
    """One replica's counters, or ``{"name", "lost": True}`` when it no longer answers (its node is gone)."""
    try:
        return {"name": name, **ray.get(handle.get_stats.remote(), timeout=60)}
    except (ray.exceptions.RayError, TimeoutError) as e:
        log.warning("teacher %s gave no counters (%s)", name, type(e).__name__)
        return {"name": name, "lost": True}


def teacher_stats(handles: list, cfg: Config, names: list[str] | None = None,
                  train_wall_s: float | None = None) -> dict:
    """report.json's ``teacher`` counters, summed over the actors (zeros for ``teacher.mode: local``).

    A replica restarted during the run counts from its restart; one that no longer answers is listed as lost.

    Args:
        names: the actors' names (default ``replica-R``).
        train_wall_s: the wall time of training, for each replica's ``utilisation`` (``busy_wall_s`` over it).
    Returns:
        ``mode``, ``replicas``, ``requests``, ``mean_batch``, ``busy_s``; with actors also ``forwards``,
        ``mean_batch_samples``, ``multi_client_forwards`` (forwards that merged requests of two or more
        segments), ``requests_by_segment``, ``per_replica`` (name, node, pid, counters, ``utilisation``),
        ``requests_by_node`` (``"client node -> replica node"``: requests) and ``node_local_share`` (the share of
        the train workers' requests served on their own node).
    """
    n = len(handles) if handles else (cfg.teacher.replicas if cfg.teacher.replicas != "per_node" else 0)
    base = {"mode": cfg.teacher.mode, "replicas": n if cfg.teacher.mode == "actor" else 0}
    if not handles:
        return {**base, "requests": 0, "mean_batch": 0.0, "busy_s": 0.0}
    names = names or [f"replica-{r}" for r in range(len(handles))]
    per = [_replica_stats(h, name) for h, name in zip(handles, names)]
    stats = [s for s in per if not s.get("lost")]
    req = sum(s["requests"] for s in stats)
    fwd = sum(s["forwards"] for s in stats)
    routes = {f"{c} -> {s['node_id']}": v for s in stats for c, v in s["by_node"].items() if c}
    from_workers = sum(routes.values())
    local = sum(v for s in stats for c, v in s["by_node"].items() if c and c == s["node_id"])
    keep = ("name", "lost", "node_id", "node_ip", "pid", "requests", "forwards", "busy_s", "busy_wall_s")
    return {**base, "requests": req, "forwards": fwd, "mean_batch": req / max(1, fwd),
            "mean_batch_samples": sum(s["samples"] for s in stats) / max(1, fwd),
            "busy_s": sum(s["busy_s"] for s in stats),
            "multi_client_forwards": sum(s.get("multi_client_forwards", 0) for s in stats),
            "requests_by_segment": {c: sum(s["by_client"].get(c, 0) for s in stats)
                                    for c in sorted({c for s in stats for c in s["by_client"]})},
            "per_replica": [{**{k: s[k] for k in keep if k in s},
                             # capped: forwards just before the window (validation targets) may fall outside it
                             **({"utilisation": round(min(1.0, s["busy_wall_s"] / train_wall_s), 4)}
                                if train_wall_s and "busy_wall_s" in s else {})} for s in per],
            "requests_by_node": routes,
            "node_local_share": round(local / from_workers, 4) if from_workers else None}
