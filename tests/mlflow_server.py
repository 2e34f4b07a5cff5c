"""A real ``mlflow server`` on 127.0.0.1 for tests (tracking + proxied artifacts), started and stopped by id.

Usage (a fixture)::

    url, proc = start_mlflow_server(tmp_path)
    try: ... MlflowClient(url) ...
    finally: stop_mlflow_server(proc)

Artifacts are served by the server itself (``--serve-artifacts --artifacts-destination DIR``): experiments get
``mlflow-artifacts:/<id>`` locations and clients upload over HTTP, the way a remote server works. (With
``--default-artifact-root /ABS`` instead, clients write straight into that folder: only works on a shared disk.)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mlflow_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("mlflow")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mlflow"]


def start_mlflow_server(tmp_path: str | Path, timeout: float = 120.0) -> tuple[str, subprocess.Popen]:
    """Starts ``mlflow server`` with a SQLite store and proxied artifacts under ``tmp_path``.

    Args:
        tmp_path: folder for ``mlflow.db``, ``mlartifacts/`` and ``server.log``.
        timeout: seconds to wait for ``/health`` (about 15 s on 2 idle cores, up to a minute when busy).
    Returns:
        ``(url, proc)``; ``proc`` leads its own process group (stop it with :func:`stop_mlflow_server`).
    """
    root = Path(tmp_path).resolve()
    root.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):  # the port may be taken between free_port() and bind: one more try
        port = free_port()
        log = open(root / "server.log", "ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        proc = subprocess.Popen(
            [*_mlflow_cmd(), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(root / "mlartifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=str(root))
        log.close()
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return url, proc
            except OSError:
                time.sleep(0.5)
        stop_mlflow_server(proc)
        tail = (root / "server.log").read_text(errors="replace")[-2000:]
        if attempt == 0 and "address already in use" in tail.lower():
            continue
        raise RuntimeError(f"mlflow server did not answer {url}/health within {timeout:.0f} s; log tail:\n{tail}")
    raise AssertionError("unreachable")


def stop_mlflow_server(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stops the server's process group (the server and its uvicorn/huey workers)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass
    try:  # workers the server left behind in its group
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
