"""MLflow tracking, driver side only: one parent run per distillation, one child run per segment, artifacts.

Workers never talk to MLflow (one client, in the driver, not one per worker); they report through Ray and the driver
feeds :meth:`RunTracker.on_progress`. Everything goes through one :class:`mlflow.tracking.MlflowClient` (no
fluent global state), so several trackers can live in one process (Tune trials).

A slow or down tracking server never stops training: every MLflow call goes through :class:`~o2mkd_ray.tracking.resilient.ResilientMlflow`, which
retries for a bounded time, then warns once per kind of call and lists what was lost in ``tracker.not_logged``
(the driver copies it into ``report.json``); after such a failure the tracker skips calls for ``cooldown_s``
instead of waiting on the server again. Metrics that could not be sent stay buffered and go out with the next
call that gets through.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path

from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from o2mkd_ray.tracking.http_env import scoped_env
from o2mkd_ray.tracking.pyfunc import save_pipeline_model
from o2mkd_ray.tracking.redaction import config_params, flatten, redact, redact_config
from o2mkd_ray.tracking.resilient import ResilientMlflow
from o2mkd_ray.tracking.store import (
    artifact_location,
    git_commit,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
OUT_TAG = "o2mkd.out"  # the run folder; a rerun of an unfinished run with the same --out continues its MLflow run
MODEL_NAME = "model"  # the pyfunc model: mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
PIPELINE_PATH = "pipeline"  # the diffusers folder, as plain run artifacts
ARTIFACT_HTTP_TIMEOUT_S = 60  # one artifact upload may take longer than a metric batch
MAX_BUFFERED = 50_000  # metric values per segment kept while the store is unreachable
LIVE_FLUSH_S = 2.0  # live metrics wait at most this long for the next batch to the store


class RunTracker(ResilientMlflow):
    """MLflow parent run + one child run per segment, fed from the driver.

    Args:
        tracking_uri: overrides :func:`resolve_tracking_uri` (which runs in :meth:`start`).
        parent_run_id: nest this tracker's run under an existing run (e.g. a Tune experiment's run).
        max_call_s: bound on one call, retries included (an artifact upload: one try of up to 60 s, then one more).
        http_timeout_s: MLflow's per-request HTTP timeout inside this tracker's calls (MLflow's own retries are off).
        retries: tries per call (quick failures such as a refused connection; a timed-out try counts its time).
        cooldown_s: after a call fails for transport reasons, calls are skipped for this long rather than
            waiting on a dead server again (metrics stay buffered; a missing parent run is retried after it).
        resume: a rerun with the same ``--out`` continues that folder's unfinished MLflow run (same run ids).

    Attributes:
        run_id: the parent run (None until the store answered).
        tracking_uri: where runs go, credentials stripped (safe to print and save).
        not_logged: short descriptions of what could not be logged.
    """

    def __init__(self, tracking_uri: str | None = None, *, parent_run_id: str | None = None,
                 max_call_s: float = 10.0, http_timeout_s: float = 5.0, retries: int = 3, cooldown_s: float = 30.0,
                 resume: bool = True):
        super().__init__(tracking_uri, max_call_s=max_call_s, http_timeout_s=http_timeout_s, retries=retries,
                         cooldown_s=cooldown_s)
        self.tracking_uri: str | None = redact("tracking_uri", tracking_uri) if tracking_uri else None
        self.parent_run_id = parent_run_id
        self.resume = resume
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.segment_runs: dict[int, str] = {}
        self.model_uri: str | None = None
        self._cfg = None
        self._start_args: tuple | None = None
        self._resumed = False
        self._boundaries: list[int] | None = None
        self._pending: dict[int, list[Metric]] = {}
        self._flushed_at = 0.0
        self._lock = threading.RLock()

    # -------------------------------------------------------------------------------------------------- runs

    def start(self, cfg, out: str | Path, tags: dict | None = None, boundaries=None) -> str | None:
        """Creates (or gets) the experiment ``cfg.mlflow.experiment`` and the parent run named ``cfg.name``.

        Params are the flattened config (``a.b.c``), tags the package version, git commit, Ray address, number
        of segments and ``tags``; all redacted. Never raises for tracking-store trouble.

        Args:
            cfg: the resolved :class:`~o2mkd_ray.config.schema.Config`.
            out: the run folder.
            tags: extra tags.
            boundaries: the resolved segment boundaries (else from ``cfg.segments.boundaries`` or
                :meth:`set_boundaries`); become the child runs' params.
        Returns:
            The parent run id, or None if the store could not be reached (it is tried again on later calls).
        """
        from o2mkd_ray import __version__

        self._cfg = cfg
        if boundaries is not None or cfg.segments.boundaries:
            self.set_boundaries(boundaries if boundaries is not None else cfg.segments.boundaries)
        if self._uri is None:
            self._uri = resolve_tracking_uri(cfg, out)
            self.tracking_uri = redact("tracking_uri", self._uri)
        out = Path(out).expanduser().resolve()
        run_tags = {"o2mkd.version": __version__, "o2mkd.num_segments": str(cfg.segments.n), OUT_TAG: str(out),
                    "o2mkd.ray_address": cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local",
                    "mlflow.source.name": "o2mkd-ray"}
        if commit := git_commit():
            run_tags["mlflow.source.git.commit"] = commit
        if self.parent_run_id:
            run_tags[PARENT_TAG] = self.parent_run_id
        run_tags.update({str(k): str(v) for k, v in (tags or {}).items()})
        self._start_args = (out, {k: redact(k, v)[:MAX_TAG_VAL_LENGTH] for k, v in run_tags.items()})
        with self._lock:
            return self._start()

    def _start(self) -> str | None:
        out, run_tags = self._start_args
        cfg, what = self._cfg, "parent run (config params, tags)"
        exp_name = cfg.mlflow.experiment

        def get_experiment():
            exp = self.client.get_experiment_by_name(exp_name)
            if exp is not None:
                return exp.experiment_id
            try:
                return self.client.create_experiment(exp_name, artifact_location(self._uri, exp_name))
            except MlflowException as e:  # created meanwhile by a concurrent run (Tune trials)
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                return self.client.get_experiment_by_name(exp_name).experiment_id

        self.experiment_id = self._call("start", what, get_experiment)
        if self.experiment_id is None:
            return None
        existing = self._call("start", None, lambda: self._search_parent(out)) if self.resume else None
        if existing:
            self.run_id, self._resumed = existing, True
            self._call("start", None, lambda: self.client.update_run(existing, status="RUNNING"))
            self._adopt_children()
        else:
            def create():
                return self.client.create_run(self.experiment_id, run_name=cfg.name, tags=run_tags).info.run_id

            self.run_id = self._call("start", what, create, retry_fn=lambda: self._search_parent(out) or create())
            if self.run_id is None:
                return None
        self.not_logged = [x for x in self.not_logged if not x.startswith(what)]  # a late start got through
        self._log_params(self.run_id, config_params(cfg.to_dict()), "config params")
        self._log_batch(self.run_id, "tags", [RunTag(k, v) for k, v in run_tags.items()], "parent run tags")
        self.log_dict(redact_config(cfg.to_dict()), "config.json")
        return self.run_id

    def _ensure_started(self) -> bool:
        if self.run_id is None and self._start_args is not None and time.monotonic() >= self._down_until:
            self._start()
        return self.run_id is not None

    def _search_parent(self, out: Path) -> str | None:
        # the newest unfinished run of this --out with the same nesting (raw: callers wrap it in _call)
        flt = f"tags.`{OUT_TAG}` = '{str(out).replace(chr(39), chr(39) * 2)}' and attributes.status != 'FINISHED'"
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=5,
                                       order_by=["attributes.start_time DESC"])
        return next((r.info.run_id for r in runs if r.data.tags.get(PARENT_TAG) == self.parent_run_id), None)

    def _search_child(self, k: int) -> str | None:
        flt = f"tags.`{PARENT_TAG}` = '{self.run_id}' and tags.`o2mkd.segment` = '{k}'"
        runs = self.client.search_runs([self.experiment_id], filter_string=flt, max_results=1)
        return runs[0].info.run_id if runs else None

    def _adopt_children(self) -> None:
        runs = self._call("start", None, lambda: self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{self.run_id}'", max_results=1000))
        for r in runs or []:
            if m := re.fullmatch(r"seg-(\d+)", r.info.run_name or ""):
                self.segment_runs[int(m.group(1))] = r.info.run_id
                self._call("start", None, lambda rid=r.info.run_id: self.client.update_run(rid, status="RUNNING"))

    def set_boundaries(self, boundaries) -> None:
        """The resolved segment boundaries ``[0, b_1, ..., T]`` (the driver knows T once the teacher is loaded)."""
        self._boundaries = [int(b) for b in boundaries]

    def segment_run(self, k: int) -> str | None:
        """The child run of segment ``k`` (``seg-KK``), created on first use with params boundaries and width."""
        with self._lock:
            if k in self.segment_runs:
                return self.segment_runs[k]
            if not self._ensure_started():
                return None
            name = f"seg-{k:02d}"

            def create():
                return self.client.create_run(self.experiment_id, run_name=name,
                                              tags={PARENT_TAG: self.run_id, "o2mkd.segment": str(k)}).info.run_id

            # not listed as lost here: its metrics stay buffered, and finish() lists them if the run never comes
            rid = self._call("segment_run", None, create, retry_fn=lambda: self._search_child(k) or create())
            if rid is None:
                return None
            self.segment_runs[k] = rid
            params = {"segment": str(k)}
            if self._boundaries and k + 1 < len(self._boundaries):
                lo, hi = self._boundaries[k], self._boundaries[k + 1]
                params.update(boundaries=f"[{lo}, {hi})", t_min=str(lo), t_max=str(hi - 1))
            if self._cfg is not None:
                for key, v in (("width", self._cfg.students.width), ("layers_per_block",
                                                                      self._cfg.students.layers_per_block)):
                    if v is not None:
                        params[key] = str(v[k] if isinstance(v, list) else v)
            self._log_params(rid, params, f"{name} params")
            return rid

    # ----------------------------------------------------------------------------------------------- metrics

    def on_progress(self, k: int, metrics: dict) -> None:
        """Logs every numeric metric of one report of segment ``k`` to its child run at ``step=metrics["step"]``.

        Never raises. What cannot be sent now stays buffered and goes with a later report or :meth:`finish`.
        """
        step = int(metrics.get("step", 0))
        ts = metrics.get("time")
        ts_ms = int(ts * 1000) if isinstance(ts, (int, float)) and ts > 1e9 else int(time.time() * 1000)
        batch = [Metric(str(key)[:MAX_ENTITY_KEY_LENGTH], float(v), ts_ms, step) for key, v in metrics.items()
                 if key not in ("step", "segment", "time", "kind") and isinstance(v, (int, float))
                 and not isinstance(v, bool)]
        with self._lock:
            pending = self._pending.setdefault(k, [])
            pending.extend(batch)
            if len(pending) > MAX_BUFFERED:  # a long outage: keep the newest
                self._lost(f"seg-{k:02d}: oldest metric values (buffer full during an outage)")
                del pending[: len(pending) - MAX_BUFFERED]
            # live metrics (every train.log_every steps of every segment) go in batches, at most every
            # LIVE_FLUSH_S; a checkpoint report goes at once
            if metrics.get("kind") != "log" or time.monotonic() - self._flushed_at >= LIVE_FLUSH_S:
                self.flush()

    def flush(self) -> bool:
        """Sends buffered metrics; True when nothing is left (on_progress calls it, :meth:`finish` once more)."""
        with self._lock:
            self._flushed_at = time.monotonic()
            for k in sorted(self._pending):
                pending = self._pending[k]
                rid = self.segment_run(k) if pending else None
                while pending and rid is not None:
                    chunk = pending[:MAX_METRICS_PER_BATCH]
                    if not self._call("log_metrics", None, lambda c=chunk: self.client.log_batch(rid, metrics=c) or 1):
                        return False  # kept for the next try
                    del pending[: len(chunk)]
            return not any(self._pending.values())

    def log_metrics(self, metrics: dict, run_id: str | None = None, step: int = 0) -> None:
        """Logs the numeric leaves of ``metrics`` (nested keys flattened to ``a.b``) to ``run_id`` (default: the
        parent run), e.g. the final report's numbers."""
        ms = [Metric(str(k)[:MAX_ENTITY_KEY_LENGTH], float(v), int(time.time() * 1000), step)
              for k, v in flatten(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        with self._lock:
            rid = run_id or (self.run_id if self._ensure_started() else None)
        if rid is None:
            self._lost(f"{len(ms)} run metrics (no run)")
            return
        self._log_batch(rid, "metrics", ms, f"{len(ms)} run metrics")

    def _log_params(self, run_id: str, params: dict[str, str], what: str) -> None:
        if self._resumed:  # a continued run: MLflow rejects changing a logged param, so log only new ones
            run = self._call("log_params", None, lambda: self.client.get_run(run_id))
            have = run.data.params if run is not None else {}
            if changed := sorted(k for k in params if k in have and have[k] != params[k]):
                self._lost(f"{what}: changed on resume, MLflow keeps the first values: {', '.join(changed)[:200]}")
            params = {k: v for k, v in params.items() if k not in have}
        self._log_batch(run_id, "params", [Param(k, v) for k, v in params.items()], what)

    def _log_batch(self, run_id: str, field: str, items: list, what: str) -> None:
        size = MAX_METRICS_PER_BATCH if field == "metrics" else MAX_PARAMS_TAGS_PER_BATCH
        for i in range(0, len(items), size):
            chunk = items[i:i + size]
            self._call(f"log_{field}", what, lambda c=chunk: self.client.log_batch(run_id, **{field: c}) or 1)

    # --------------------------------------------------------------------------------------------- artifacts

    def log_dict(self, d: dict, artifact_file: str, run_id: str | None = None) -> None:
        """Writes ``d`` as JSON to ``artifact_file`` of ``run_id`` (default: the parent run)."""
        rid = run_id or self.run_id
        if rid is None:
            self._lost(f"artifact {artifact_file} (no run)")
            return
        self._call("log_artifacts", f"artifact {artifact_file}",
                   lambda: self.client.log_dict(rid, d, artifact_file) or 1, ARTIFACT_HTTP_TIMEOUT_S)

    def log_artifacts(self, paths_or_dirs, artifact_path: str | None = None, run_id: str | None = None) -> None:
        """Uploads files and folders to ``run_id`` (default: the parent run).

        Args:
            paths_or_dirs: a path or a list of paths; a folder goes to ``artifact_path/<folder name>/``, a file
                to ``artifact_path/<file name>``; missing paths are listed in ``not_logged``.
            artifact_path: folder inside the run's artifacts (None: the root).
        """
        paths = [paths_or_dirs] if isinstance(paths_or_dirs, (str, Path)) else list(paths_or_dirs)
        with self._lock:
            rid = run_id or (self.run_id if self._ensure_started() else None)
        for p in map(Path, paths):
            if rid is None or not p.exists():
                self._lost(f"artifact {p.name} ({'no run' if rid is None else 'missing'})")
                continue
            if p.is_dir():
                dest = "/".join(x for x in (artifact_path, p.name) if x)
                fn = lambda p=p, dest=dest: self.client.log_artifacts(rid, str(p), dest) or 1  # noqa: E731
            else:
                fn = lambda p=p: self.client.log_artifact(rid, str(p), artifact_path) or 1  # noqa: E731
            self._call("log_artifacts", f"artifact {p.name}", fn, ARTIFACT_HTTP_TIMEOUT_S)

    def log_pipeline(self, pipeline_dir: str | Path, as_model: bool = True) -> str | None:
        """Logs the exported pipeline folder to the parent run: as plain artifacts under ``pipeline/`` and, with
        ``as_model``, as an MLflow pyfunc model named ``model`` (load it with
        ``mlflow.pyfunc.load_model(f"runs:/{run_id}/model")`` or :attr:`model_uri`).

        Does nothing when ``cfg.mlflow.log_pipeline`` is false.
        Returns:
            The model URI ``models:/<model_id>``, or None.
        """
        if self._cfg is not None and not self._cfg.mlflow.log_pipeline:
            return None
        pipeline_dir = Path(pipeline_dir)
        with self._lock:
            started = self._ensure_started()
        if not started or not pipeline_dir.is_dir():
            self._lost(f"pipeline ({'no run' if not started else 'missing folder'})")
            return None
        self._call("log_artifacts", "artifact pipeline", lambda: self.client.log_artifacts(
            self.run_id, str(pipeline_dir), PIPELINE_PATH) or 1, ARTIFACT_HTTP_TIMEOUT_S)
        return self._log_model(pipeline_dir) if as_model else None

    def _log_model(self, pipeline_dir: Path) -> str | None:
        # the client-only equivalent of mlflow.pyfunc.log_model, which uses the global tracking URI and active
        # run: create the LoggedModel, save the pyfunc folder locally, upload it, finalize, link it to the run
        from mlflow.models import Model

        model = self._call("log_model", "pyfunc model", lambda: self.client.create_logged_model(
            self.experiment_id, name=MODEL_NAME, source_run_id=self.run_id, model_type="o2mkd-pipeline"))
        if model is None:
            return None
        ok = None
        try:
            with tempfile.TemporaryDirectory(prefix="o2mkd-model-") as tmp:
                meta = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=self.run_id,
                             model_id=model.model_id)
                path = save_pipeline_model(pipeline_dir, Path(tmp) / "model", mlflow_model=meta)
                ok = self._call("log_model", "pyfunc model artifacts", lambda: self.client.log_model_artifacts(
                    model.model_id, str(path)) or 1, ARTIFACT_HTTP_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - saving locally failed: the run goes on without the model
            log.warning("could not save the pipeline as an MLflow model: %s", e)
            self._lost(f"pyfunc model ({type(e).__name__}: {str(e)[:100]})")
        status = LoggedModelStatus.READY if ok else LoggedModelStatus.FAILED
        self._call("log_model", None, lambda: self.client.finalize_logged_model(model.model_id, status))
        if not ok:
            return None
        self._call("log_model", "pyfunc model link to the run", lambda: self.client.log_outputs(
            self.run_id, [LoggedModelOutput(model.model_id, step=0)]) or 1)
        self.model_uri = f"models:/{model.model_id}"
        return self.model_uri

    # ------------------------------------------------------------------------------------------------ finish

    def finish(self, status: str = "FINISHED") -> None:
        """Flushes buffered metrics, then ends the child runs and the parent run with ``status`` (``FINISHED``,
        ``FAILED`` or ``KILLED``). What still could not be sent is listed in ``not_logged``. Never raises for
        tracking-store trouble."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status: must be FINISHED, FAILED or KILLED, got {status!r}")
        with self._lock:
            self._down_until = 0.0  # one last try, even after an outage
            self.flush()
            if self.run_id is None and self._start_args is not None:
                self._lost("parent run (config params, tags)")
            for k, pending in sorted(self._pending.items()):
                if pending:
                    self._lost(f"seg-{k:02d}: {len(pending)} metric values (steps {pending[0].step}-"
                               f"{pending[-1].step})")
                    pending.clear()
            for k, rid in sorted(self.segment_runs.items()):
                self._call("finish", f"seg-{k:02d} end", lambda rid=rid: self._end_quietly(rid, status))
            if self.run_id is not None:
                self._call("finish", "parent run end", lambda: self.client.set_terminated(self.run_id, status) or 1)

    def _end_quietly(self, run_id: str, status: str) -> int:
        # MLflow prints "View run ... at: URL" when a run ends on a server: once for the parent is enough
        with scoped_env(self.http_timeout_s, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT="true"):
            self.client.set_terminated(run_id, status)
        return 1

    def summary(self) -> dict:
        """What the driver puts into ``report.json["mlflow"]``."""
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id,
                "segment_runs": {f"seg-{k:02d}": v for k, v in sorted(self.segment_runs.items())},
                "model_uri": self.model_uri, "not_logged": list(self.not_logged)}

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish("FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED")
