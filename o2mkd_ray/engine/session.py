"""A distillation session around either engine: pre-flight, the MLflow run, the quick evaluation, artifacts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.atomic import write_json
from o2mkd_ray.distill.local import train_local
from o2mkd_ray.distill.run_folder import run_hash
from o2mkd_ray.engine.run_folder import finish_run
from o2mkd_ray.errors import ConfigError

log = logging.getLogger(__name__)


def preflight(cfg: Config, out: str | Path, strict: bool = True) -> Path:
    """Validates teacher, data and output folder. Raises ConfigError (one line) on bad input.

    Args:
        strict: False for ``--dry-run``: missing optional packages (torchvision, datasets) only warn.
    """
    from o2mkd_ray.config.checks import check_out_path
    from o2mkd_ray.core.teacher_checks import check_run
    from o2mkd_ray.data.build import check_data

    check_run(cfg)  # teacher files + segments vs the teacher's T + every student's shape (meta device)
    for w in check_data(cfg.data, strict=strict):
        log.warning("%s", w)
    out = check_out_path(out).resolve()  # a file, a path under a file, read-only: one line, nothing created
    prev = out / "config.json"
    if prev.is_file():
        try:
            old = json.loads(prev.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"--out {str(out)!r}: config.json is corrupted; use a new --out folder") from None
        if run_hash(old) != run_hash(cfg.to_dict()):
            raise ConfigError(
                f"--out {str(out)!r} already holds a different run (config differs); use a new --out or the same config to resume"
            )
    elif out.is_dir() and any(p.name not in (".", "..") for p in out.iterdir()):
        if not (out / "ray").exists():
            raise ConfigError(f"--out {str(out)!r} is not empty and holds no o2mkd-ray run; use an empty or new folder")
    return out


def tracked_session(cfg: Config, out, engine: str, tracker, parent_run_id, body, checked: bool = False) -> dict:
    """Pre-flight (unless ``checked``), MLflow parent run around ``body(tracker)``, quick evaluation, artifacts,
    final report."""
    out = Path(out).expanduser().resolve() if checked else preflight(cfg, out)
    own = tracker is None and cfg.mlflow.enabled
    if own:
        from o2mkd_ray.tracking.tracker import RunTracker, resolve_tracking_uri

        tracker = RunTracker(resolve_tracking_uri(cfg, out), parent_run_id=parent_run_id,
                             http_timeout_s=cfg.mlflow.timeout_s, max_call_s=2 * cfg.mlflow.timeout_s)
        tracker.start(cfg, out, tags={"o2mkd.engine": engine})
    try:
        report = body(tracker)
        if cfg.eval.enabled:
            report["eval"] = _quick_eval(cfg, out, tracker)
            write_json(out / "report.json", report)
        if tracker is not None:
            tracker.log_artifacts([out / f for f in ("config.json", "samples.png", "history.json")])
            if cfg.mlflow.log_pipeline:
                tracker.log_pipeline(out / "pipeline")
            report["mlflow"] = tracker.summary()
            write_json(out / "report.json", report)
            tracker.log_artifacts([out / "report.json"])
            report["mlflow"] = tracker.summary()  # run ids can be filled late if the server was down
            write_json(out / "report.json", report)
    except BaseException:
        if own:
            tracker.finish("FAILED")
        raise
    if own:
        tracker.finish("FINISHED")
    return report


def _quick_eval(cfg: Config, out: Path, tracker) -> dict:
    """``distill``'s default end: a short evaluation (``eval.*``), its files and metrics logged to MLflow."""
    from o2mkd_ray.eval.evaluate import evaluate_run

    try:
        ev = evaluate_run(out, num_images=cfg.eval.num_images, steps=cfg.eval.steps, latency_repeats=2,
                          agreement_samples=128, num_reference=256)
    except Exception as e:  # noqa: BLE001 - the students are saved; a failed evaluation must not lose them
        log.warning("quick evaluation failed (%s); rerun `o2mkd-ray eval %s`", e, out)
        return {"error": str(e)}
    if tracker is not None:
        tracker.log_metrics({f"eval/{k}": v for k, v in ev.get("metrics", {}).items()})
        tracker.log_artifacts([out / "eval"])  # a folder keeps its name: eval/...
    return ev.get("metrics", {})


def run_local(cfg: Config, out: str | Path, progress: bool = True, tracker=None,
              parent_run_id: str | None = None, checked: bool = False) -> dict:
    """The same distillation as :func:`o2mkd_ray.engine.driver.run_distillation` without Ray: segments one after
    another, in-process (``checked``: the caller already ran :func:`preflight`)."""
    return tracked_session(cfg, out, "local", tracker, parent_run_id, _local_body(cfg, out, progress), checked)


def _local_body(cfg: Config, out, progress: bool):
    def body(tracker) -> dict:
        res = train_local(cfg, out, progress, on_report=tracker.on_progress if tracker else None,
                          on_segments=tracker.set_boundaries if tracker else None)
        return finish_run(cfg, **res, extra={"engine": "local"})

    return body
