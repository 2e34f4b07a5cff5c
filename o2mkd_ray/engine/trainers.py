"""One Ray Train ``TorchTrainer`` per segment, all fitted at once while the driver relays their live metrics.

The driver (:mod:`o2mkd_ray.engine.driver`) calls, in order: :func:`student_inits`, :func:`loop_configs`, then
:func:`fit_all` with a :class:`ProgressRelay`; each segment's :func:`fit_segment` picks the checkpoint
``train.select`` keeps and copies its EMA student into ``OUT/segments/seg-KK``.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import ray

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.segments import Segments
from o2mkd_ray.distill.run_folder import save_segment, segment_summary

log = logging.getLogger(__name__)


def student_inits(cfg: Config, teacher, n: int) -> list[dict]:
    """Every student's class, config and initial weights, built once on the driver for the workers.

    Args:
        teacher: the loaded teacher (students are sliced from it, or built from scratch: ``students.init``).
        n: the number of segments.
    Returns:
        One ``{"class", "config", "state"}`` per segment, weights as numpy arrays (cheap in the object store).
    """
    from o2mkd_ray.core.students import build_students

    return [{"class": type(s).__name__,
             "config": {k: v for k, v in dict(s.config).items() if not k.startswith("_")},
             "state": {k: v.detach().cpu().numpy() for k, v in s.state_dict().items()}}
            for s in build_students(cfg, teacher, n)]


def loop_configs(cfg: Config, segments: Segments, scheduler, todo: list[int], inits: list[dict],
                 teacher_names: list[str], teacher_channels: dict[str, int], cond_ref=None,
                 teacher_nodes: dict[str, str] | None = None) -> dict[int, dict]:
    """The ``train_loop_config`` of each segment in ``todo`` (read by ``train_loop_per_worker``).

    Args:
        todo: the segments left to train.
        inits: :func:`student_inits` (each put in the object store here).
        teacher_names: the teacher actors' names (``[]``: ``teacher.mode: local``, a teacher copy per worker).
        teacher_channels: channels of the teacher blocks used for feature KD (``{}``: none).
        cond_ref: text-to-image runs: the object-store reference of the latents + text embeddings.
        teacher_nodes: ``{actor name: node id}`` of the teacher replicas (workers prefer the one on their node).
    Returns:
        ``{segment: config}``. Object-store references travel wrapped in a list so that Ray passes them as
        references, fetched in the worker.
    """
    common = {"cfg": cfg.to_dict(), "boundaries": list(segments.boundaries),
              "scheduler_config": dict(scheduler.config), "teacher_names": teacher_names,
              "teacher_nodes": dict(teacher_nodes or {}),
              "teacher_channels": teacher_channels, "feature_blocks": list(teacher_channels) or None,
              "cond_data": [cond_ref] if cond_ref is not None else None}
    return {k: {**common, "segment": k, "student_init": [ray.put(inits[k])]} for k in todo}


def make_trainer(cfg: Config, k: int, loop_config: dict, storage: str, callbacks: list | None = None):
    """Segment ``k``'s TorchTrainer: its workers, resources (``ray.segment_overrides``) and placement
    (``ray.placement``), and a stable run name (``seg-KK`` under ``storage``) so that the same command resumes in
    place. A worker lost with its node counts as a failure: ``ray.max_failures`` restarts the group (elsewhere)
    from its last checkpoint.

    Args:
        loop_config: the segment's :func:`loop_configs` entry.
        storage: Ray Train's storage path (``ray.storage_path`` or ``OUT/ray``).
        callbacks: Ray Train run callbacks (a Tune trial's controller registry).
    Returns:
        The (unfitted) ``TorchTrainer``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from o2mkd_ray.engine.placement import PLACEMENT_STRATEGY
    from o2mkd_ray.engine.train_loop import train_loop_per_worker

    r = cfg.ray
    ov = r.segment_overrides.get(str(k))
    workers = (ov.num_workers if ov and ov.num_workers else None) or r.workers_per_segment
    cpus = ov.cpus_per_worker if ov and ov.cpus_per_worker is not None else r.cpus_per_worker
    gpus = ov.gpus_per_worker if ov and ov.gpus_per_worker is not None else r.gpus_per_worker
    resources = {"CPU": cpus} if cpus else {}
    if gpus:
        resources["GPU"] = gpus
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=resources,
                                     placement_strategy=PLACEMENT_STRATEGY[r.placement]),
        run_config=RunConfig(
            name=f"seg-{k:02d}", storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=r.num_to_keep, checkpoint_score_attribute="step",
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=r.max_failures),
            callbacks=list(callbacks or []) or None,
        ),
    )


def pick_checkpoint(cfg: Config, result):
    """The checkpoint ``train.select`` keeps (``final``: the last; ``best``: the lowest ``val_loss``) and its
    metrics."""
    if cfg.train.select == "best" and result.best_checkpoints:
        return min(result.best_checkpoints, key=lambda cm: cm[1].get("val_loss", float("inf")))
    return result.checkpoint, (result.metrics or {})


def fit_segment(cfg: Config, k: int, loop_config: dict, storage: str, out: Path, segments: Segments,
                callbacks: list | None = None) -> dict:
    """Trains segment ``k`` to the end and saves its chosen EMA student into ``OUT/segments/seg-KK``.

    Returns:
        The segment's summary (``o2mkd_ray.distill.run_folder.segment_summary`` plus the fit and worker times,
        ``teacher_wait_share`` of the last attempt, and ``workers``: each rank's node, from the rank ledgers or,
        without them, rank 0's own).
    Raises:
        The training error when the run failed (after Ray Train's retries).
    """
    t0 = time.time()
    result = make_trainer(cfg, k, loop_config, storage, callbacks).fit()
    if result.error:
        raise result.error
    ckpt, metrics = pick_checkpoint(cfg, result)
    run = {"started_at": t0, "finished_at": time.time(), **(getattr(result, "return_value", None) or {})}
    from o2mkd_ray.engine.placement import ledger_placement

    workers = ledger_placement(storage, k) or ([{"rank": 0, **{key: run[key] for key in ("node_id", "node_ip")}}]
                                              if run.get("node_id") else [])
    from o2mkd_ray.engine.storage import checkpoint_uri

    where = checkpoint_uri(ckpt) if ckpt else None
    summary = segment_summary(k, segments, run, metrics, where, fit_started_at=t0,
                              fit_finished_at=time.time(), worker_entered_at=run.get("entered_at"),
                              train_s=run.get("train_s"), teacher_wait_share=run.get("teacher_wait_share"),
                              loop_started_at=run.get("loop_started_at"),
                              workers=workers)
    with ckpt.as_directory() as d:
        save_segment(out, k, Path(d), summary)
    log.info("segment %d saved: %d steps, loss %.4f", k, summary["steps"], summary["final_loss"] or float("nan"))
    return summary


class ProgressRelay:
    """The workers' live metrics to the driver: a Ray queue they put into, drained here into listeners.

    The queue is telemetry only (each report is also in the segment's checkpoints and rank ledgers), so losing it
    never fails a run: an unreachable queue is retried at the next drain, a dead one is dropped with one warning and
    the run goes on without live curves.

    Args:
        listeners: called as ``listener(segment, metrics)``; one that raises is logged, never fatal to training.
    """

    def __init__(self, listeners: list[Callable[[int, dict], None]]):
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node: on a cluster, a queue on a worker node would be lost with that node
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.listeners = listeners
        self.lost: str | None = None  # why the queue was dropped, once it was

    def drain(self, timeout: float) -> None:
        """Hands every queued report to the listeners, waiting up to ``timeout`` seconds for the first."""
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.util.queue import Empty

        if self.lost is not None:
            time.sleep(timeout)
            return
        try:
            items = [self.queue.get(timeout=timeout)] + self.queue.get_nowait_batch(max(0, self.queue.qsize()))
        except Empty:
            return
        except ActorUnavailableError as e:  # a transient RPC failure: the actor may answer next time
            log.warning("progress queue unreachable (%s); retrying", e)
            time.sleep(timeout)
            return
        except RayActorError as e:  # the queue's actor died: training goes on, live metrics stop
            self.lost = str(e)
            log.warning("progress queue lost (%s); live metrics stop, the checkpoints and ledgers keep them", e)
            return
        for m in items:
            for f in self.listeners:
                try:
                    f(int(m["segment"]), m)
                except Exception as e:  # noqa: BLE001 - a listener (e.g. MLflow) must not kill training
                    log.warning("progress listener failed: %s", e)


def fit_all(configs: dict[int, dict], fit: Callable[[int, dict], dict], relay: ProgressRelay) -> dict[int, dict]:
    """Runs ``fit(k, loop_config)`` for every segment at once (one thread each: ``fit`` blocks in Ray Train) while
    relaying progress; the workers find the relay's queue in their config under ``progress``.

    Returns:
        ``{segment: summary}``.
    Raises:
        RuntimeError: naming every failed segment, from the first failure.
    """
    results, errors = {}, {}
    with ThreadPoolExecutor(max_workers=max(1, len(configs))) as pool:
        futs = {k: pool.submit(fit, k, {**c, "progress": [relay.queue]}) for k, c in configs.items()}
        while not all(f.done() for f in futs.values()):
            relay.drain(0.5)
        relay.drain(0.01)
        for k, f in futs.items():
            try:
                results[k] = f.result()
            except BaseException as e:  # noqa: BLE001 - report every failed segment, then raise
                errors[k] = e
    if errors:
        k, e = next(iter(errors.items()))
        raise RuntimeError(f"segment(s) {sorted(errors)} failed; first error (segment {k}): {e}") from e
    return results
