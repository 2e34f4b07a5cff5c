"""The shared teacher served as named Ray actor(s), and the client that train workers call.

The server actor loads the teacher once and answers ``predict(x_t, t, features)`` under ``no_grad``. Requests that
arrive together (from different segments' workers) are merged into one forward of at most ``max_batch`` samples,
waiting at most ``max_wait_ms`` for company; ``max_concurrency`` forwards may run at once (on a 2-core CPU, 2
concurrent forwards served most samples/s: 207 vs 122-127 with one). ``max_restarts`` brings a crashed server back; the client retries.
The server counts ``multi_client_forwards``: forwards that merged requests of two or more clients (segments).
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
                      "pid": os.getpid(), "multi_client_forwards": 0}
        self._busy_lock = threading.Lock()
        self.by_client: dict[str, int] = {}
        self.on_request = teacher_hook(fault)  # test-only fault drill (debug.kill_teacher_after_requests) or None

    def ready(self) -> dict:
        return {"pid": os.getpid(), "blocks": self.fn.blocks}

    def feature_channels(self, shape: tuple[int, int, int]) -> dict[str, int]:
        return self.fn.feature_channels(tuple(shape))

    def get_stats(self) -> dict:
        s = dict(self.stats)
        s["mean_batch"] = s["requests"] / max(1, s["forwards"])  # requests merged per forward
        s["mean_batch_samples"] = s["samples"] / max(1, s["forwards"])
        s["by_client"] = dict(self.by_client)
        return s

    def _forward(self, x: np.ndarray, t: np.ndarray, features: bool, cond: np.ndarray | None = None):
        t0 = time.perf_counter()
        eps, feats = self.fn(torch.from_numpy(x), torch.from_numpy(t), features=features,
                             cond=to_torch(cond))
        out = (eps.cpu().numpy(), {k: v.cpu().numpy() for k, v in feats.items()} if feats else None)
        with self._busy_lock:
            self.stats["busy_s"] += time.perf_counter() - t0
            self.stats["forwards"] += 1
        return out

    async def predict(self, x_t: np.ndarray, t: np.ndarray, features: bool = False, client: str = "",
                      cond: np.ndarray | dict | None = None):
        """``x_t: (B, C, H, W)``, ``t: (B,)``, ``cond``: a conditional teacher's condition as numpy (text
        embeddings ``(B, L, D)``, or a dict with SDXL's ``text_embeds`` / ``time_ids``) →
        ``(eps_T, feats_T | None)`` numpy."""
        self.stats["requests"] += 1
        self.by_client[client] = self.by_client.get(client, 0) + 1
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
                  fault: dict | None = None) -> list:
    """Starts ``teacher.replicas`` named actors (or reuses live ones with those names).

    Args:
        tcfg: the teacher config (model, replicas, resources, batching).
        run_id: the run's id in the actor names (:func:`actor_names`).
        feature_blocks: teacher blocks whose features requests may ask for (None: none).
        fault: a test-only fault spec (``o2mkd_ray.engine.faults.teacher_fault``).
    Returns:
        The actors' handles, once every actor answered ``ready``.
    """
    cls = ray.remote(_Server)
    handles = []
    for name in actor_names(run_id, tcfg.replicas):
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
    """

    def __init__(self, names: list[str], seed: int = 0, retries: int = 20, client: str = ""):
        self.names = list(names)
        self.client = client
        self.rng = random.Random(seed)
        self.retries = retries
        self._handles: dict[str, object] = {}
        self.latency_s = 0.0
        self.calls = 0

    def _handle(self, name: str):
        if name not in self._handles:
            try:
                self._handles[name] = ray.get_actor(name)
            except ValueError as e:  # not (re)registered yet
                raise _NotRegistered(str(e)) from None
        return self._handles[name]

    def submit(self, x_t: torch.Tensor, t: torch.Tensor, features: bool = False, cond: torch.Tensor | None = None):
        name = self.rng.choice(self.names)  # spread load over replicas
        args = (x_t.detach().cpu().numpy(), t.detach().cpu().numpy(), features, self.client,
                to_numpy(cond))
        return (name, args, self._handle(name).predict.remote(*args), time.perf_counter())

    def result(self, pending) -> tuple[torch.Tensor, dict | None]:
        name, args, ref, t0 = pending
        for attempt in range(self.retries + 1):
            try:
                if ref is None:
                    ref = self._handle(name).predict.remote(*args)
                eps, feats = ray.get(ref)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, _NotRegistered) as e:
                if attempt == self.retries:
                    raise
                log.warning("teacher %s unavailable (%s); retrying", name, type(e).__name__)
                time.sleep(min(2.0, 0.2 * (attempt + 1)))
                self._handles.pop(name, None)
                ref = None
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


def teacher_stats(handles: list, cfg: Config) -> dict:
    """report.json's ``teacher`` counters, summed over the actors (zeros for ``teacher.mode: local``).

    Returns:
        ``mode``, ``replicas``, ``requests``, ``mean_batch``, ``busy_s``; with actors also ``forwards``,
        ``mean_batch_samples``, ``multi_client_forwards`` (forwards that merged requests of two or more
        segments) and ``requests_by_segment``.
    """
    base = {"mode": cfg.teacher.mode, "replicas": cfg.teacher.replicas if cfg.teacher.mode == "actor" else 0}
    if not handles:
        return {**base, "requests": 0, "mean_batch": 0.0, "busy_s": 0.0}
    stats = ray.get([h.get_stats.remote() for h in handles])
    req = sum(s["requests"] for s in stats)
    fwd = sum(s["forwards"] for s in stats)
    return {**base, "requests": req, "forwards": fwd, "mean_batch": req / max(1, fwd),
            "mean_batch_samples": sum(s["samples"] for s in stats) / max(1, fwd),
            "busy_s": sum(s["busy_s"] for s in stats),
            "multi_client_forwards": sum(s.get("multi_client_forwards", 0) for s in stats),
            "requests_by_segment": {c: sum(s["by_client"].get(c, 0) for s in stats)
                                    for c in sorted({c for s in stats for c in s["by_client"]})}}
