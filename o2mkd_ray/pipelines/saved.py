"""Loading saved pipeline folders whose ``model_index.json`` names this package's modules.

diffusers imports a component's class only from a module that is already loaded (it never imports a module just
because a folder names one). A folder saved by an earlier version of this package names the module paths of that
version (``o2mkd_ray.pipelines.multi_unet``), which nothing imports any more; this mixin imports the ``o2mkd_ray.*`` modules
a folder names, and nothing else, before diffusers loads the components.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

PACKAGE = "o2mkd_ray"
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")


def recorded_modules(model_index: dict) -> list[str]:
    """The ``o2mkd_ray`` module paths a pipeline's ``model_index.json`` records for its components."""
    mods = []
    for value in model_index.values():
        if isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], str):
            if value[0] == PACKAGE or value[0].startswith(PACKAGE + "."):
                mods.append(value[0])
    return sorted(set(mods))


class ImportsRecordedModules:
    """Mixin for ``DiffusionPipeline`` subclasses: ``from_pretrained`` first imports the package modules the saved
    ``model_index.json`` names (current or older paths)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        path = Path(str(pretrained_model_name_or_path)).expanduser()
        try:
            if (path / "model_index.json").is_file():
                index = json.loads((path / "model_index.json").read_text())
            else:  # a hub id: diffusers fetches (or finds in its cache) the index first anyway
                index = cls.load_config(pretrained_model_name_or_path,
                                        **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        except (OSError, ValueError):
            index = {}  # diffusers' own loading reports a missing or broken folder
        for module in recorded_modules(index):
            importlib.import_module(module)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
