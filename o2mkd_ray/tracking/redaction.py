"""Secrets never reach MLflow: redaction of config values and the flattened params.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
)

_SECRET_KEY = re.compile(r"token|passw(or)?d|secret|credential|api_?key|access_?key|private_?key|^auth$|"
                         r"authorization|session_?key|signature", re.I)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")

# bounded repeats: no quadratic backtracking on long values
_SECRET_ASSIGN = re.compile(r"(?P<k>[A-Za-z0-9_.-]{0,40}(?:token|passw(?:or)?d|secret|key|sig|signature|credential)"
                            r"[A-Za-z0-9_.-]{0,40})(?P<sep>\s?[=:]\s?)(?P<v>[^&\s,;'\"]+)", re.I)
_SECRET_VALUE = re.compile(r"\b(?:hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|"
                           r"AKIA[0-9A-Z]{16}|xox[abpr]-[A-Za-z0-9-]{10,}|eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_.-]+)")
REDACTED = "***"


def redact(key: str, value: Any) -> str:
    """``value`` as a string safe to log under ``key``.

    Secret-looking keys (token, password, secret, api_key, ...) get ``***``; in values, userinfo is stripped from
    URIs (``http://user:pass@host`` -> ``http://host``), ``token=…``/``key=…`` assignments are masked, and
    well-known token shapes (``hf_…``, ``ghp_…``, ``sk-…``, ``AKIA…``, JWTs) are replaced.
    """
    leaf = str(key).rsplit(".", 1)[-1]
    if _SECRET_KEY.search(leaf) and value not in (None, "", [], {}):
        return REDACTED
    s = value if isinstance(value, str) else str(value)
    s = _USERINFO.sub(lambda m: m.group("scheme"), s)
    s = _SECRET_ASSIGN.sub(lambda m: f"{m.group('k')}{m.group('sep')}{REDACTED}", s)
    return _SECRET_VALUE.sub(REDACTED, s)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty mapping stays a leaf (``{}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _param_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)


def config_params(cfg_dict: dict) -> dict[str, str]:
    """Flattened, stringified, redacted and truncated params of a config dict (MLflow's limits)."""
    return {k[:MAX_ENTITY_KEY_LENGTH]: redact(k, _param_value(v)[:MAX_PARAM_VAL_LENGTH])
            for k, v in flatten(cfg_dict).items()}


def redact_config(d: Any, key: str = "") -> Any:
    # the same redaction on the nested config (for the config.json artifact)
    if isinstance(d, dict):
        return {k: redact_config(v, f"{key}.{k}" if key else str(k)) for k, v in d.items()}
    if _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and d not in (None, "", [], {}):
        return REDACTED
    if isinstance(d, list):
        return [redact(key, v) if isinstance(v, str) else v for v in d]
    return redact(key, d) if isinstance(d, str) else d
