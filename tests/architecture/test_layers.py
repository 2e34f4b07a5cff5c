"""The package's shape is checked, not hoped for: import-linter's layer contracts, no import cycles (function-level
imports included), and no private name imported from another module."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PKG = ROOT / "o2mkd_ray"
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "HOME": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory) -> Path:
    """A copy of the package and its contracts, to break on purpose."""
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: install the test extra (import-linter)")
    root = tmp_path_factory.mktemp("layers")
    shutil.copytree(PKG, root / "o2mkd_ray", ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_layer_contracts_hold():
    r = _lint(ROOT)
    assert r.returncode == 0 and " 0 broken" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(("module", "line", "needle"), [
    ("core/segments.py", "from o2mkd_ray.engine import driver", "o2mkd_ray.core is not allowed to import o2mkd_ray.engine"),
    ("distill/loop.py", "import ray", "o2mkd_ray.distill is not allowed to import ray"),
    ("config/schema.py", "import torch", "o2mkd_ray.config is not allowed to import torch"),
    ("pipelines/build.py", "import mlflow", "o2mkd_ray.pipelines is not allowed to import mlflow"),
], ids=["core->engine", "distill->ray", "config->torch", "pipelines->mlflow"])
def test_a_wrong_import_breaks_the_contracts(tree_copy, module, line, needle):
    f = tree_copy / "o2mkd_ray" / module
    original = f.read_text()
    try:
        f.write_text(original + f"\n\ndef _wrong():\n    {line}\n")  # function-level imports count too
        r = _lint(tree_copy)
        assert r.returncode != 0, r.stdout
        assert needle in " ".join(r.stdout.split()), r.stdout
    finally:
        f.write_text(original)


def _package_imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (any depth: function-level imports included)."""
    graph: dict[str, set[str]] = {}
    for p in PKG.rglob("*.py"):
        mod = ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("o2mkd_ray"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("o2mkd_ray"))
            assert not (isinstance(node, ast.ImportFrom) and node.level > 0), f"{p}: relative import"
    return graph


def test_no_import_cycles():
    graph = _package_imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph.get(m, ()):
            if d not in graph:
                continue
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(d):] + [d]) if d in path else d)
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("o2mkd_ray"):
                bad += [f"{p.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad
