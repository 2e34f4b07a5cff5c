"""Building a :class:`Config` from YAML or plain data: ``--set a.b=c`` overrides, did-you-mean, one-line errors.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from o2mkd_ray.config.base import validate_as
from o2mkd_ray.config.schema import WHOLE_RUN, Config
from o2mkd_ray.errors import ConfigError


def build_section(cls: type, data: Any, prefix: str = "") -> Any:
    """Builds one config section (or any config model or plain dataclass of config types) from a mapping.

    Args:
        cls: e.g. :class:`~o2mkd_ray.config.schema.TeacherConfig`.
        data: its fields as plain data; None means all defaults.
        prefix: its dotted key in the config tree, for messages ("" when it stands alone).
    Returns:
        An instance of ``cls``; a ConfigError line names the key of the first problem.
    """
    return validate_as(cls, data, prefix)


def known_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted leaf keys of the config tree (for did-you-mean and Tune space checks).

    Args:
        cls: the model whose keys to list (the whole :class:`Config` by default).
        prefix: dotted key of ``cls``.
    Returns:
        Keys such as ``train.steps``, in field order.
    """
    out = []
    for name, f in cls.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = f.annotation
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            out += known_keys(tp, key)
        else:
            out.append(key)
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """Splits one ``--set`` item.

    Args:
        item: ``"a.b=c"``.
    Returns:
        ``("a.b", c)`` with ``c`` parsed as YAML (an empty value is None; unparsable YAML stays the raw string).
    """
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set students.width=0.5")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict, key: str, value: Any) -> None:
    """Sets ``data[a][b] = value`` for ``key = "a.b"``, creating mappings on the way.

    Args:
        data: nested mappings, changed in place.
        key: a dotted key of the config tree (or a sub-key of ``students.unet``, ``ray.segment_overrides``, ``debug``).
        value: the value to set.
    """
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {key}: empty key part")
    valid = known_keys()
    # mapping-valued leaves (students.unet, ray.segment_overrides, debug) may take sub-keys
    mapping_leaves = ("students.unet", "ray.segment_overrides", "debug")
    if key not in valid and not any(key.startswith(m + ".") for m in mapping_leaves):
        close = difflib.get_close_matches(key, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{key}'{hint}")
    d = data
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def from_dict(data: dict | None, overrides: list[str] | None = None) -> Config:
    """Builds and checks a whole run's config from plain data and ``--set`` overrides.

    Args:
        data: the config as nested mappings (e.g. parsed YAML, or ``cfg.to_dict()``); the caller's copy is untouched.
        overrides: ``["a.b=c", ...]``, applied in order.
    Returns:
        A :class:`Config` that passed every rule, those between sections included.
    """
    data = json.loads(json.dumps(data or {}))  # deep copy, JSON-safe
    for item in overrides or []:
        k, v = parse_override(item)
        set_dotted(data, k, v)
    return validate_as(Config, data, context={WHOLE_RUN: True})


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Loads a YAML (or JSON) config file, applies ``--set`` overrides and validates.

    Args:
        path: a YAML file; None gives the embedded default (``pipelines/digits.yaml`` equivalent).
        overrides: ``["a.b=c", ...]``.
    Returns:
        A validated :class:`Config`.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a YAML file such as pipelines/digits.yaml")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            where = f" line {line + 1}" if line is not None else ""
            raise ConfigError(f"config file {str(p)!r}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(p)!r}: top level must be a mapping of sections (teacher:, data:, ...)")
    return from_dict(data, overrides)
