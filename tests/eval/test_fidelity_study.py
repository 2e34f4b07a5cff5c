"""benchmarks/fidelity_study.py on a tiny random teacher: a bad grid is one line, a 2-cell x 2-seed grid runs
through the local engine and evaluation, a rerun resumes without retraining, and docs/fidelity.md's cells are the
mean ± sample std of the results.jsonl rows (computed here independently)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import fidelity_study as fs

from o2mkd_ray.errors import ConfigError

TINY_GRID = {
    "config": "pipelines/tiny.yaml",
    "width": 0.5,
    "seeds": [0, 1],
    "eval": {"num_images": 4, "eval_steps": 2, "agreement_samples": 12, "num_reference": 16},
    "overrides": ["train.batch_size=8", "train.val_batches=1", "train.checkpoint_every=10", "sampling.steps=2",
                  "train.num_threads=1"],
    "teachers": {"tiny": {"spec": "tiny"}},
    "questions": {"q": {
        "title": "tiny", "asks": "does it run", "teachers": ["tiny"],
        "cells": [{"name": "one", "n": 1, "steps": 2}, {"name": "two", "n": 2, "steps": 3}],
        "compare": [{"a": "two", "b": "one", "label": "two vs one"}],
    }, "p": {
        # "same" is cell "two" again (equal widths as a list): its rows are reused, not trained again
        "title": "reuse", "asks": "is a repeated cell trained once", "teachers": ["tiny"],
        "cells": [{"name": "same", "n": 2, "steps": 3, "width": [0.5, 0.5]}],
    }},
}


def _write(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid, allow_unicode=True, sort_keys=False))  # questions in declared order
    return path


@pytest.mark.parametrize("breakage, words", [
    (lambda g: g["questions"]["q"]["cells"][1].update(boundaries=[0, 1000]), "boundaries has 2 entries"),
    (lambda g: g["questions"]["q"]["cells"][0].update(stpes=3), "stpes"),
    (lambda g: g["questions"]["q"]["compare"][0].update(a="three"), "'three'"),
    (lambda g: g["questions"]["q"].update(teachers=["nobody"]), "'nobody'"),
])
def test_bad_grid_is_one_line_naming_the_key(tmp_path, breakage, words):
    grid = json.loads(json.dumps(TINY_GRID))
    breakage(grid)
    with pytest.raises(ConfigError) as e:
        fs.load_grid(_write(tmp_path / "grid.yaml", grid))
    msg = str(e.value)
    assert "\n" not in msg and words in msg, msg


def _row_cells(md: str, cell: str) -> dict[str, str]:
    """The table row of ``cell`` as {column header: text}."""
    lines = md.splitlines()
    head = next(ln for ln in lines if ln.startswith("| cell |"))
    row = next(ln for ln in lines if ln.startswith(f"| `{cell}` |"))
    split = lambda ln: [c.strip() for c in ln.strip().strip("|").split("|")]
    return dict(zip(split(head), split(row), strict=True))


def test_tiny_grid_runs_resumes_and_reports_mean_std(tmp_path):
    grid_path = _write(tmp_path / "grid.yaml", TINY_GRID)
    out, doc = tmp_path / "out", tmp_path / "docs" / "fidelity.md"
    argv = ["--grid", str(grid_path), "--out", str(out), "--doc", str(doc), "--plots", str(tmp_path / "docs")]
    assert fs.main(argv) == 0
    results = out / "results.jsonl"
    rows = [json.loads(ln) for ln in results.read_text().splitlines()]
    assert sorted(r["key"] for r in rows) == sorted(
        [f"tiny/q/{c}/seed{s}" for c in ("one", "two") for s in (0, 1)] + [f"tiny/p/same/seed{s}" for s in (0, 1)])
    assert {r["cell"]: r["n"] for r in rows} == {"one": 1, "two": 2, "same": 2}
    assert all(r["student_steps"] == {"one": 2, "two": 6, "same": 6}[r["cell"]] for r in rows)
    # the repeated cell was not trained: no run folder, its rows are cell two's (same seed) with their origin named
    assert not (out / "tiny" / "p").exists()
    for s in (0, 1):
        two = next(r for r in rows if r["key"] == f"tiny/q/two/seed{s}")
        same = next(r for r in rows if r["key"] == f"tiny/p/same/seed{s}")
        assert same["reused_from"] == two["key"] and same["agree_all"] == two["agree_all"]
    rows = [r for r in rows if r["question"] == "q"]

    # a rerun trains and evaluates nothing: no new rows, no run folder file rewritten
    stamps = {p: p.stat().st_mtime_ns for p in (out / "tiny").rglob("*") if p.is_file()}
    before = results.read_text()
    stats = fs.run_grid(fs.load_grid(grid_path), out)
    assert stats == {"ran": 0, "skipped": 6, "reused": 0}
    assert results.read_text() == before
    assert {p: p.stat().st_mtime_ns for p in (out / "tiny").rglob("*") if p.is_file()} == stamps

    md = doc.read_text()
    for cell in ("one", "two"):
        got = _row_cells(md, cell)
        assert got["seeds"] == "2"
        for key, header, _ in fs.METRICS:
            v = np.array([r[key] for r in rows if r["cell"] == cell], dtype=float)
            assert got[header] == f"{v.mean():.4g} ± {v.std(ddof=1):.2g}", (cell, header)
    # the conclusion names the cell with the lower mean overall ε MSE as the better one
    mean = {c: np.mean([r["agree_all"] for r in rows if r["cell"] == c]) for c in ("one", "two")}
    better = min(mean, key=mean.get)
    assert f"ε MSE all: `{better}` better" in md
    assert (tmp_path / "docs" / "fidelity_q_tiny.png").is_file()
