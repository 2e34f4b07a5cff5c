"""The console of a command: the project's own lines on the terminal, other programs' internals in a log file.

Ray's and MLflow's INFO output (database migrations, token-auth notices, resource requests, worker start-up, every
Train report) goes to ``OUT/logs/driver.log`` and Ray's session logs; the terminal shows this package's progress,
its warnings and every ERROR. ``--verbose`` shows everything, as the libraries print it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _OnConsole(logging.Filter):
    """This package's warnings, and anyone's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or (record.name.startswith("o2mkd_ray")
                                                    and record.levelno >= logging.WARNING)


def quiet_libraries() -> None:
    """Before MLflow is imported: it adds its own stderr handler unless told not to."""
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def setup_console(log_file: str | Path | None, verbose: bool) -> Path | None:
    """Routes logging: everything (INFO and up) to ``log_file``; the terminal gets this package's warnings and every
    error, or everything when ``verbose``. Progress bars of diffusers/transformers are off unless ``verbose``.

    Returns:
        The log file's path (None when none was asked for).
    """
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if verbose:
        console.setLevel(logging.INFO)
    else:
        console.addFilter(_OnConsole())
    root.addHandler(console)
    path = None
    if log_file is not None:
        path = Path(log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(path)
        fh.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(fh)
    if log_file is not None:  # a run: Ray's import installs its own stderr handler, replaced below
        import ray  # noqa: F401
    for name in ("mlflow", "alembic", "ray"):  # in case they set up their own handlers before us
        lib = logging.getLogger(name)
        lib.handlers.clear()
        lib.propagate = True
        lib.setLevel(logging.INFO)
    if not verbose:
        from diffusers.utils import logging as dlogging

        dlogging.disable_progress_bar()
        dlogging.set_verbosity_error()
    return path
