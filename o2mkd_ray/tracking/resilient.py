"""MLflow calls that never stop training: bounded retries, a cooldown after the store failed, one warning per kind
of call, and a list of what could not be logged.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from o2mkd_ray.tracking.http_env import scoped_env
from o2mkd_ray.tracking.redaction import redact

log = logging.getLogger(__name__)

# errors the server gives for a bad request: retrying cannot help, and the server is fine (no cooldown)
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
              "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "FEATURE_DISABLED"}



class ResilientMlflow:
    """One :class:`mlflow.tracking.MlflowClient` behind bounded, warn-once calls (the base of the run tracker).

    Args:
        tracking_uri: the store (None: MLflow's default, resolved when the client is first used).
        max_call_s: bound on one call, retries included.
        http_timeout_s: MLflow's per-request HTTP timeout inside the calls (MLflow's own retries are off).
        retries: tries per call (quick failures such as a refused connection; a timed-out try counts its time).
        cooldown_s: after a call fails for transport reasons, calls are skipped for this long rather than waiting
            on a dead server again.

    Attributes:
        not_logged: short descriptions of what could not be logged (at most 100).
    """

    def __init__(self, tracking_uri: str | None, *, max_call_s: float = 10.0, http_timeout_s: float = 5.0,
                 retries: int = 3, cooldown_s: float = 30.0):
        self._uri = tracking_uri
        self.max_call_s, self.http_timeout_s, self.retries = max_call_s, http_timeout_s, retries
        self.cooldown_s = cooldown_s
        self.not_logged: list[str] = []
        self._client: MlflowClient | None = None
        self._warned: set[str] = set()
        self._down_until = 0.0

    def _lost(self, what: str) -> None:
        if what in self.not_logged:
            return
        if len(self.not_logged) < 100:  # a long outage must not grow report.json without bound
            self.not_logged.append(what)
        elif not self.not_logged[-1].startswith("..."):
            self.not_logged.append("... (further losses not listed)")

    def _call(self, kind: str, what: str | None, fn: Callable[[], Any], http_timeout_s: float | None = None,
              retry_fn: Callable[[], Any] | None = None) -> Any:
        """Runs ``fn`` with bounded retries (``retry_fn`` for the retries: creates first look for what an
        unanswered try may have made); on failure warns once per ``kind``, records ``what`` (unless None) in
        ``not_logged`` and returns None."""
        if time.monotonic() < self._down_until:
            if what:
                self._lost(f"{what} (tracking store unavailable)")
            return None
        timeout = http_timeout_s or self.http_timeout_s
        budget = max(self.max_call_s, timeout + 1.0)
        t0, delay, err = time.monotonic(), 0.25, None
        for attempt in range(self.retries):
            try:
                with scoped_env(timeout):
                    return (retry_fn if attempt and retry_fn else fn)()
            except MlflowException as e:
                err = e
                if e.error_code in _PERMANENT:
                    break
            except Exception as e:  # noqa: BLE001 - connection errors, timeouts, 5xx: retry, then give up
                err = e
            if time.monotonic() - t0 + delay + timeout > budget:  # another try could overrun the budget
                break
            time.sleep(delay)
            delay *= 2
        if not (isinstance(err, MlflowException) and err.error_code in _PERMANENT):
            self._down_until = time.monotonic() + self.cooldown_s
        if kind not in self._warned:
            self._warned.add(kind)
            msg = (str(err).splitlines() or [type(err).__name__])[0][:300]
            log.warning("MLflow %s failed (%s: %s); training goes on, what is not logged is listed in "
                        "report.json", kind, type(err).__name__, redact("error", msg))
        if what:
            self._lost(what)
        return None

    @property
    def client(self) -> MlflowClient:
        """The MLflow client (made on first use)."""
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self._uri)
        return self._client
