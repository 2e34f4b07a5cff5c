"""Ray Train storage for a run: where its checkpoints go (``ray.storage_path`` or ``OUT/ray``), a pre-flight check
of a remote store, and the storage credentials every Ray process of the run needs.

Ray Train opens ``ray.storage_path`` with ``pyarrow.fs.FileSystem.from_uri``, so an S3-compatible server (MinIO,
Ceph, moto, ...) is named the way pyarrow reads it: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` in the
environment, or ``s3://bucket/prefix?endpoint_override=http://host:port`` in the URI; credentials come from the
usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``) variables. The endpoint resolved on
the driver travels with the pickled filesystem, but credentials do not: every worker resolves them from its own
environment, which on a cluster is not the driver's. :func:`storage_env` is what the driver forwards to its job.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from o2mkd_ray.config.schema import Config
from o2mkd_ray.errors import ConfigError

# environment variables that configure cloud storage clients (AWS SDK / pyarrow S3, Google Cloud, Azure): forwarded
# to the run's Ray job when set on the driver, so that workers on other nodes open the same store
STORAGE_ENV_PREFIXES = ("AWS_",)
STORAGE_ENV_NAMES = ("GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY",
                     "AZURE_STORAGE_SAS_TOKEN")
_USERINFO = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@]+@")


def display_storage(path: str) -> str:
    """A storage path safe to print: a URI without keys given in it (``s3://KEY:SECRET@bucket``) and without its
    query."""
    return _USERINFO.sub(lambda m: m.group("scheme"), path.partition("?")[0]) if is_uri(path) else path


def is_uri(path: str) -> bool:
    """Whether a storage path is a URI (``s3://``, ``gs://``, ...) rather than a local/shared folder."""
    return "://" in path


def join_storage(base: str, *parts: str) -> str:
    """``base/part/...`` for a folder or a URI; a URI's query (``?endpoint_override=...``) stays at the end."""
    if not is_uri(base):
        return str(Path(base, *parts))
    head, sep, query = base.partition("?")
    return "/".join([head.rstrip("/"), *parts]) + sep + query


# pyarrow filesystem type names -> URI schemes (a Ray Train checkpoint's path carries no scheme)
_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs"}


def checkpoint_uri(checkpoint) -> str:
    """Where a Ray Train ``Checkpoint`` is, as a user would pass it on: the local path, or ``s3://bucket/...``
    (``checkpoint.path`` alone drops the scheme of remote storage)."""
    kind = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    scheme = _SCHEMES.get(kind)
    return f"{scheme}://{checkpoint.path}" if scheme else checkpoint.path


def run_storage(cfg: Config, out: Path) -> str:
    """Where this run's trainers keep their checkpoints: ``OUT/ray``, or a folder of its own under
    ``ray.storage_path`` (``NAME-HASH``, the hash of the resolved ``--out``): several runs may share one storage
    path, and the same command (same ``--out``) finds its checkpoints again to resume."""
    if not cfg.ray.storage_path:
        return str(out / "ray")
    key = hashlib.sha1(str(Path(out).expanduser().resolve()).encode()).hexdigest()[:8]
    return join_storage(cfg.ray.storage_path, f"{cfg.name}-{key}")


def storage_env(environ: dict | None = None) -> dict[str, str]:
    """The storage client variables set here (``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``, Azure's): the
    driver hands them to its Ray job (``runtime_env`` ``env_vars``) so workers on every node can open the store."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if k.startswith(STORAGE_ENV_PREFIXES) or k in STORAGE_ENV_NAMES}


def s3_endpoint(uri: str) -> tuple[str | None, str]:
    """The S3 endpoint pyarrow will use for ``uri`` and where it comes from: the URI's ``endpoint_override``,
    else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``; ``(None, "AWS")`` for AWS itself."""
    q = parse_qs(urlsplit(uri).query).get("endpoint_override")
    if q:
        return q[0], "endpoint_override in ray.storage_path"
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var], var
    return None, "AWS"


def _reach(endpoint: str, source: str, timeout_s: float) -> None:
    """One TCP connect to an S3 endpoint (the SDK itself retries a dead one for seconds to minutes)."""
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError(f"ray.storage_path: cannot reach the S3 endpoint {endpoint} (from {source}): "
                          f"{e.strerror or type(e).__name__}; start the server or fix the endpoint") from None


def check_storage(storage_path: str | None, timeout_s: float = 3.0) -> None:
    """Pre-flight of a remote ``ray.storage_path``: the endpoint answers, the bucket exists, and a probe object
    can be written and deleted under the prefix with the credentials set here. Local folders are left to Ray.

    Raises:
        ConfigError: one line naming what to fix (endpoint, bucket, credentials), before any Ray work.
    """
    if not storage_path or not is_uri(storage_path):
        return
    import pyarrow.fs as pafs
    from pyarrow.lib import ArrowException

    where = display_storage(storage_path)
    if storage_path.startswith("s3://"):
        endpoint, source = s3_endpoint(storage_path)
        if endpoint:
            _reach(endpoint, source, timeout_s)
    try:
        fs, path = pafs.FileSystem.from_uri(storage_path)
    except (ArrowException, OSError, ValueError) as e:
        raise ConfigError(f"ray.storage_path: cannot open {where!r} ({_first_line(e)}); check the URI, the endpoint "
                          "and credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)") from None
    bucket = path.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except (ArrowException, OSError) as e:
        raise ConfigError(f"ray.storage_path: cannot read bucket {bucket!r} of {where!r} ({_first_line(e)}); "
                          "check the endpoint and credentials") from None
    if not found:
        raise ConfigError(f"ray.storage_path: bucket {bucket!r} of {where!r} does not exist; create it first "
                          "or name an existing bucket")
    probe = f"{path.rstrip('/')}/.o2mkd-probe-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"o2mkd-ray storage check\n")
        fs.delete_file(probe)
    except (ArrowException, OSError) as e:
        raise ConfigError(f"ray.storage_path: cannot write under {where!r} ({_first_line(e)}); check the "
                          "credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and their permissions") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
