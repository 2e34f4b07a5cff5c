"""Every third-party package the code imports is declared in pyproject.toml, and the optional ones (extras) are
imported only inside the functions that need them, so a plain install runs the unconditional workflow."""

from __future__ import annotations

import ast
import re
import sys
import tomllib

from conftest import ROOT

# import name -> distribution name, where they differ
DIST = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "cleanfid": "clean-fid",
        "torch_fidelity": "torch-fidelity"}
# modules that load only on a text-to-image path (the CLI, eval and the pyfunc model import them lazily)
TEXT_TO_IMAGE_ONLY = {"o2mkd_ray/pipelines/stable_diffusion.py", "o2mkd_ray/pipelines/stable_diffusion_xl.py"}


def _dist(module: str) -> str:
    return DIST.get(module, module).lower().replace("_", "-")


def _requirements() -> tuple[set[str], dict[str, set[str]]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    base = {name.match(r)[0].lower().replace("_", "-") for r in project["dependencies"]}
    extras = {k: {name.match(r)[0].lower().replace("_", "-") for r in v}
              for k, v in project["optional-dependencies"].items()}
    return base, extras


def _imports() -> dict[str, list[tuple[str, bool]]]:
    """top-level module -> [(file, imported at module level)]"""
    out: dict[str, list[tuple[str, bool]]] = {}
    for p in sorted((ROOT / "o2mkd_ray").rglob("*.py")):
        tree = ast.parse(p.read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                mod = n.split(".")[0]
                if mod in sys.stdlib_module_names or mod == "o2mkd_ray":
                    continue
                out.setdefault(mod, []).append((str(p.relative_to(ROOT)), id(node) in top))
    return out


def test_every_imported_package_is_declared():
    base, extras = _requirements()
    declared = base | set().union(*extras.values())
    missing = {m: sites[0][0] for m, sites in _imports().items() if _dist(m) not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_optional_packages_load_only_where_needed():
    base, _ = _requirements()
    eager = []
    for mod, sites in _imports().items():
        if _dist(mod) in base:
            continue
        eager += [f"{f}: {mod}" for f, top in sites if top and f not in TEXT_TO_IMAGE_ONLY]
    assert not eager, f"optional packages imported at module level: {eager}"
