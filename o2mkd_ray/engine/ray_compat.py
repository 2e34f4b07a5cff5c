"""Every use of Ray internals (names outside Ray's public API) in one place, each with a clear error when the
installed Ray has moved it. The rest of the package uses Ray's public API only.
"""

from __future__ import annotations

import os
import socket

from o2mkd_ray.config.checks import ray_host_port
from o2mkd_ray.errors import ConfigError

# The Ray versions these internals were verified on (pyproject pins ray to this range).
TESTED_RAY = ((2, 60), (2, 60))


def check_ray_address(address: str | None, key: str = "ray.address", timeout_s: float = 3.0) -> None:
    """Fails fast (one TCP connect, ``timeout_s``) when an existing Ray cluster's address is unreachable.

    ``ray.init(address=...)`` on a dead address keeps retrying for minutes; this check turns that into one line.
    Nothing to check for a local embedded Ray (``address`` None or ``local``).
    """
    if not address:
        return
    if address.strip() == "auto":
        try:
            address = bootstrap_address("auto")
        except ConnectionError:
            raise ConfigError(f"{key}: 'auto' found no running Ray cluster on this machine; start one with "
                              "`ray start --head` or unset ray.address/RAY_ADDRESS for a local Ray") from None
        except RayInternalsMoved:  # leave the check to ray.init, which says what it finds
            return
    hp = ray_host_port(address, key)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot reach a Ray cluster at {address!r} ({e.strerror or type(e).__name__}); "
                          "start it with `ray start --head` or unset ray.address/RAY_ADDRESS for a local Ray") from None


def check_ray_version() -> None:
    """Raises :class:`RayInternalsMoved` on a Ray outside :data:`TESTED_RAY` (set ``O2MKD_ALLOW_UNTESTED_RAY=1`` to
    try one anyway: the internals below then fail one by one, each with its own message, if they moved)."""
    import ray

    version = tuple(int(x) for x in ray.__version__.split(".")[:2] if x.isdigit())
    lo, hi = TESTED_RAY
    if not lo <= version <= hi and os.environ.get("O2MKD_ALLOW_UNTESTED_RAY") != "1":
        raise RayInternalsMoved(
            f"Ray {ray.__version__} is untested with o2mkd-ray (tested: {lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}); install "
            f"pip install 'ray[default,train,tune]=={hi[0]}.{hi[1]}.*', or set O2MKD_ALLOW_UNTESTED_RAY=1 to try it")


class RayInternalsMoved(ImportError):
    """The installed Ray no longer has an internal name this package uses."""


def _moved(what: str, e: Exception) -> RayInternalsMoved:
    import ray

    lo, hi = TESTED_RAY
    return RayInternalsMoved(
        f"Ray {ray.__version__} has no {what} ({e}); o2mkd-ray was tested with Ray "
        f"{lo[0]}.{lo[1]}-{hi[0]}.{hi[1]}: install a tested Ray, e.g. pip install 'ray[default,train,tune]=="
        f"{hi[0]}.{hi[1]}.*'")


def controller_callback_base() -> type:
    """Ray Train V2's ``ControllerCallback`` base class (internal: hooks into a run's controller actor).

    Raises:
        RayInternalsMoved: the installed Ray moved or removed it.
    """
    try:
        from ray.train.v2._internal.execution.callback import ControllerCallback
    except ImportError as e:
        raise _moved("ray.train.v2._internal.execution.callback.ControllerCallback", e) from None
    return ControllerCallback


def bootstrap_address(address: str) -> str:
    """The GCS address ``ray.init(address="auto")`` would connect to (internal: Ray's own address lookup).

    Raises:
        ConnectionError: no running cluster was found.
        RayInternalsMoved: the installed Ray moved or removed the lookup.
    """
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError as e:
        raise _moved("ray._private.services.canonicalize_bootstrap_address_or_die", e) from None
    return canonicalize_bootstrap_address_or_die(address)


def session_logs_dir() -> str | None:
    """The logs folder of the connected Ray session on this machine (internal: the driver's node object), or None
    when this Ray does not expose it."""
    try:
        from ray._private.worker import _global_node
    except ImportError:
        return None
    return _global_node.get_logs_dir_path() if _global_node is not None else None
