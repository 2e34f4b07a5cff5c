"""Where a run's MLflow data goes: the tracking URI and, for the embedded SQLite store, the artifact folder."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

DEFAULT_DB = "mlflow.db"  # beside the run folders: runs/mlflow.db, shared by every run under runs/
DEFAULT_ARTIFACTS = "mlartifacts"


def resolve_tracking_uri(cfg, out: str | Path) -> str:
    """The tracking store for a run.

    Args:
        cfg: a :class:`~o2mkd_ray.config.schema.Config`.
        out: the run folder (``--out``).
    Returns:
        ``cfg.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else an embedded store that needs no server:
        ``sqlite:////ABS/OUT_PARENT/mlflow.db`` (absolute: Ray jobs run from an unpacked copy of the working dir).
    """
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return "sqlite:///" + str(Path(out).expanduser().resolve().parent / DEFAULT_DB)


def artifact_location(uri: str, experiment: str) -> str | None:
    # a local SQLite store gets its artifacts beside the database (MLflow's default, ./mlruns, is relative to
    # the current directory); servers and other stores decide for themselves
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    db = Path(uri[len("sqlite:///"):])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "default"
    return str(db.parent / DEFAULT_ARTIFACTS / safe)


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                           text=True, timeout=5)
        return (r.stdout.strip() or None) if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None
