"""The diffusers sampling schedulers by short name or class name, on a teacher's noise schedule.
"""

from __future__ import annotations

import difflib

from o2mkd_ray.config.schema import SCHEDULERS
from o2mkd_ray.errors import ConfigError


def make_scheduler(name: str, base_config):
    """A diffusers sampling scheduler by short name or class name, on the teacher's noise schedule."""
    import diffusers

    cls_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ConfigError(f"sampling.scheduler: unknown scheduler {name!r}; use one of {sorted(SCHEDULERS)} or a diffusers class name")
    return cls.from_config(base_config)


def check_scheduler_name(name: str, key: str) -> None:
    """Raises ConfigError unless ``name`` is a short scheduler name or a diffusers scheduler class."""
    from o2mkd_ray.config.schema import SCHEDULERS

    if name.lower() in SCHEDULERS:
        return
    import diffusers

    try:
        cls = getattr(diffusers, name, None)
    except Exception:  # noqa: BLE001 - diffusers' lazy module raises on broken optional imports
        cls = None
    if not (isinstance(cls, type) and name.endswith("Scheduler") and hasattr(cls, "from_config")):
        close = difflib.get_close_matches(name.lower(), list(SCHEDULERS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"{key}: unknown scheduler {name!r}; {hint}use one of {', '.join(sorted(SCHEDULERS))} "
                          "or a diffusers scheduler class name such as DDIMScheduler")
