"""benchmarks/gpu_check.py on a machine without a GPU: one line and exit 0; ``--dry-run`` builds and pre-flights
every variant's config (fractional GPUs, bf16 teacher, DDP) and refuses a plan whose GPU requests do not fit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600, check=False,
                          cwd=str(ROOT), env={**os.environ, **(env or {})})


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    r = _run("--out", str(tmp_path / "g"), env={"CUDA_VISIBLE_DEVICES": ""})  # hides a GPU if the runner has one
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert lines == ["gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to measure"], \
        r.stdout
    assert json.loads((tmp_path / "g" / "gpu_check.json").read_text())["gpu"] is None


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_builds_every_variant_and_checks_the_gpu_plan(tmp_path, capsys):
    out, gpu_check = tmp_path / "g", _gpu_check()  # in this process: the imports are already paid for
    assert gpu_check.main(["--dry-run", "--gpus", "2", "--steps", "3", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    v = json.loads((out / "gpu_check.json").read_text())["variants"]
    # 3 segments x 0.25 GPU + a 0.25-GPU bf16 teacher actor; the same with local teachers; 1 segment x 2 DDP ranks
    assert v["shared_actor"] == {"gpu_demand": 1.0, "segments": 3, "teacher_mode": "actor",
                                 "teacher_dtype": "bfloat16", "workers_per_segment": 1, "gpus_per_worker": 0.25}
    assert v["shared_local"]["gpu_demand"] == 0.75 and v["shared_local"]["teacher_mode"] == "local"
    assert v["ddp"] == {"gpu_demand": 2.0, "segments": 1, "teacher_mode": "local", "teacher_dtype": "bfloat16",
                        "workers_per_segment": 2, "gpus_per_worker": 1.0}
    assert "TorchTrainer seg-00: 2 worker(s) x 1 CPU + 1 GPU" in stdout, stdout
    assert (out / "teacher" / "unet" / "config.json").is_file()  # the google/ddpm-cifar10-32 shape
    assert json.loads((out / "teacher" / "unet" / "config.json").read_text())["block_out_channels"] == [128, 256,
                                                                                                        256, 256]

    with pytest.raises(SystemExit, match="shared_actor: asks for 1 GPUs, only 0 planned"):  # the teacher is reused
        gpu_check.main(["--dry-run", "--gpus", "0", "--variants", "shared_actor", "--out", str(out)])


def test_teacher_dtype_applies_on_cuda_only():
    from o2mkd_ray.config.schema import TeacherConfig
    from o2mkd_ray.core.teacher import compute_dtype

    t = TeacherConfig(dtype="bfloat16")
    assert compute_dtype(t, "cuda") == torch.bfloat16 and compute_dtype(t, torch.device("cuda:1")) == torch.bfloat16
    assert compute_dtype(t, "cpu") == torch.float32
    assert compute_dtype(TeacherConfig(), "cuda") == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_loop_reports_the_peak_gpu_memory_on_a_gpu():
    from o2mkd_ray.distill.loop import _gpu_memory

    x = torch.ones(1024, 1024, device="cuda")
    assert _gpu_memory(x.device)["gpu_peak_mb"] >= 4.0
