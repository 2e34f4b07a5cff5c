"""A plain install (no extras) runs the whole unconditional workflow: distill, sample, eval, analyze and tune, each
through the real console entry point in a fresh process in which transformers and datasets (the 'sd' extra)
cannot be imported; a text-to-image teacher then fails in one line that names the extra."""

from __future__ import annotations

import os

import pytest
from conftest import ROOT, run_cli

pytestmark = pytest.mark.slow
TINY = str(ROOT / "pipelines" / "tiny.yaml")


@pytest.fixture(scope="module")
def no_extras(tmp_path_factory) -> dict:
    """Environment of a process in which the 'sd' extra's packages are not importable (as if not installed):
    ``sys.modules[name] = None`` makes ``import name`` fail and ``importlib.util.find_spec(name)`` return None,
    in the CLI and in every Ray worker it starts (they inherit PYTHONPATH)."""
    d = tmp_path_factory.mktemp("no_extras")
    (d / "sitecustomize.py").write_text("import sys\nsys.modules.update(transformers=None, datasets=None)\n")
    return {"PYTHONPATH": os.pathsep.join([str(d), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
            "RAY_ADDRESS": ""}


def _ok(r):
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "transformers" not in r.stderr, r.stderr[-3000:]


def test_the_blocker_blocks(no_extras, tmp_path):
    r = run_cli("--help", env=no_extras)  # the CLI itself
    _ok(r)
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", "import transformers"], capture_output=True, text=True,
                       env={**os.environ, **no_extras})
    assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr


def test_unconditional_workflow_without_extras(no_extras, tiny_teacher_dir, tmp_path):
    out = tmp_path / "run"
    sets = ["--set", f"teacher.pretrained={tiny_teacher_dir}", "--set", "mlflow.enabled=false",
            "--set", "eval.enabled=false"]
    # the local engine here; the tune run below starts Ray workers, which import the engine without the extras too
    _ok(run_cli("distill", TINY, *sets, "--engine", "local", "--out", str(out), env=no_extras, timeout=600))
    assert (out / "pipeline" / "model_index.json").is_file()
    _ok(run_cli("sample", str(out / "pipeline"), "--steps", "2", "--num-images", "2", env=no_extras))
    _ok(run_cli("eval", str(out), "--num-images", "4", "--steps", "2", env=no_extras, timeout=600))
    assert (out / "eval" / "report.json").is_file()
    _ok(run_cli("analyze", TINY, *sets, "--n", "2", "--images", "8", "--timesteps", "10", "--out", str(tmp_path / "analysis"), env=no_extras))
    space = tmp_path / "space.yaml"
    space.write_text("segments.n: {choice: [1]}\nstudents.width: {per_segment_choice: [0.25, 0.5]}\n"
                     "budget: {train.steps: 4, train.checkpoint_every: 2}\n"
                     "search: {algorithm: random, scheduler: none, num_samples: 1}\n")
    _ok(run_cli("tune", TINY, str(space), *sets, "--out", str(tmp_path / "tune"), env=no_extras, timeout=900))
    assert (tmp_path / "tune" / "tune" / "results.csv").is_file()


def test_text_to_image_teacher_without_the_extra_names_it(no_extras, tmp_path):
    sd = tmp_path / "sd"
    for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (sd / c).mkdir(parents=True)
    r = run_cli("distill", TINY, "--set", f"teacher.pretrained={sd}", "--set", "teacher.kind=stable_diffusion",
                "--set", "data.kind=prompts", "--set", "data.path=p.txt", "--out", str(tmp_path / "out"),
                env=no_extras)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "'sd' extra" in lines[0] and "pip install 'o2mkd-ray[sd]'" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()
