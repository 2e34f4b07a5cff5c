"""MLflow's HTTP settings, set in the environment only while this package talks to the tracking server."""

from __future__ import annotations

import contextlib
import os
import threading

# MLflow's own HTTP client retries 7 times with backoff 2 and waits 120 s per request by default; a dead server
# would hold the driver for minutes. Inside our calls it gets one try with a short timeout; we retry ourselves.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # no tqdm bars in the driver's console
_env_lock = threading.Lock()
_env_depth = 0
_env_saved: dict[str, str | None] = {}


@contextlib.contextmanager
def scoped_env(timeout_s: float | None = None, **extra: str):
    # MLflow reads these per request from os.environ: set while one of our calls runs, restored after the last
    global _env_depth
    values = {**HTTP_ENV, **extra}
    if timeout_s is not None:
        values["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, round(timeout_s)))  # MLflow parses an int
    with _env_lock:
        if _env_depth == 0:
            _env_saved.clear()
        for k in values:
            _env_saved.setdefault(k, os.environ.get(k))
        _env_depth += 1
        os.environ.update(values)
    try:
        yield
    finally:
        with _env_lock:
            _env_depth -= 1
            if _env_depth == 0:
                for k, v in _env_saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

