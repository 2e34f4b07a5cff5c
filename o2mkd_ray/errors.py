"""Errors users see: one line that names the key or path and says what to fix.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-facing, one-line configuration error (key or path + what to fix)."""


class CheckpointError(ValueError):
    """A checkpoint folder is missing files, truncated, or from another run."""
