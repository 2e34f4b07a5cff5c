"""Is the teacher the bottleneck? ``report.json``'s ``bottleneck`` (engine/bottleneck.py): first the arithmetic on
given counters, then two real runs on local Ray whose configs put the bottleneck on either side.

The teacher made the bottleneck through config: a teacher 24x wider than the test's tiny one at 16x16 (wide enough that the students' waits stay above half
of their steps on a loaded machine too: at 16x the width a run under load measured 0.48), students an
eighth of its width (a student step costs a small fraction of a teacher forward), three segments sharing one
replica that runs one forward at a time and merges no requests (``teacher.max_batch`` = one request's samples). The teacher not the bottleneck: the same teacher, one segment whose
student is as wide as the teacher (its step, forward and backward, costs several teacher forwards), so the
teacher's answer is ready, prefetched, before the student asks for it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT

TINY = ROOT / "pipelines" / "tiny.yaml"


def _summary(train_s: float, wait: float, steps: int = 100) -> dict:
    return {"train_s": train_s, "teacher_wait_share": wait, "steps": steps, "resumed_from": 0, "workers": [{}]}


def _replica(util: float, busy: float, requests: int) -> dict:
    return {"name": "r0", "utilisation": util, "busy_wall_s": busy, "requests": requests}


def test_teacher_load_advises_replicas_from_measured_costs():
    from o2mkd_ray.engine.bottleneck import teacher_load

    # 3 segments, 10 s of steps each, 80 % waiting: 2 s of own work per 100 steps = 20 ms a step; the teacher
    # served 300 requests in 9.5 s busy (31.7 ms each). Unwaited, the workers would ask 3 / 0.02 = 150 requests/s,
    # 150 x 0.0317 = 4.75 replicas' worth -> 5
    b = teacher_load({"per_replica": [_replica(0.95, 9.5, 300)]}, {k: _summary(10.0, 0.8) for k in range(3)})
    assert b["teacher_bound"] and b["replicas_to_balance"] == 5
    assert b["teacher_utilisation"] == 0.95 and b["teacher_wait_share"] == pytest.approx(0.8)
    assert "about 5 teacher replica(s)" in b["advice"] and len(b["advice"].splitlines()) == 1
    # busy but the students seldom wait: well used, not a bottleneck
    b = teacher_load({"per_replica": [_replica(0.95, 9.5, 300)]}, {k: _summary(10.0, 0.1) for k in range(3)})
    assert not b["teacher_bound"] and b["advice"] is None
    # students wait a lot on an idle teacher: something else (transport, the batching wait), not the teacher
    b = teacher_load({"per_replica": [_replica(0.3, 3.0, 300)]}, {k: _summary(10.0, 0.8) for k in range(3)})
    assert not b["teacher_bound"] and b["advice"] is None
    # nothing measured (teacher.mode local, or every segment finished earlier): no verdict
    assert teacher_load({"mode": "local"}, {0: _summary(10.0, 0.1)}) == {}
    assert teacher_load({"per_replica": [_replica(0.95, 9.5, 300)]}, {}) == {}


@pytest.fixture(scope="module")
def wide_teacher_dir(tmp_path_factory):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(96, 192), norm_num_groups=8, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    path = tmp_path_factory.mktemp("wide") / "teacher"
    DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


def _run(wide_teacher_dir, tmp_path, capsys, *extra):
    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.engine.driver import run_distillation

    cfg = load_config(TINY, [f"teacher.pretrained={wide_teacher_dir}", "mlflow.enabled=false", "eval.enabled=false",
                             "data.resolution=16", "train.checkpoint_every=10", "train.log_every=0",
                             "teacher.replicas=1", *extra])
    report = run_distillation(cfg, tmp_path / "run", progress=True)
    return report, capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.ray
@pytest.mark.slow
def test_teacher_made_the_bottleneck_by_config_ends_the_run_with_advice(ray_local, wide_teacher_dir, tmp_path,
                                                                        capsys):
    report, last = _run(wide_teacher_dir, tmp_path, capsys, "segments.n=3", "students.width=0.125",
                        "teacher.max_concurrency=1", "teacher.max_batch=16", "train.steps=12",
                        "train.checkpoint_every=6")
    b = report["bottleneck"]
    assert b["teacher_bound"], b
    assert b["teacher_utilisation"] > 0.9 and b["teacher_wait_share"] > 0.5
    assert b["replicas_to_balance"] >= 2
    assert last == b["advice"] and f"about {b['replicas_to_balance']} teacher replica(s)" in last
    print(f"teacher-bound run: {b}")


@pytest.mark.ray
@pytest.mark.slow
def test_teacher_not_the_bottleneck_gives_no_advice(ray_local, wide_teacher_dir, tmp_path, capsys):
    report, last = _run(wide_teacher_dir, tmp_path, capsys, "segments.n=1", "students.width=1.0", "train.steps=8",
                        "train.checkpoint_every=4")
    b = report["bottleneck"]
    assert not b["teacher_bound"] and b["advice"] is None, b
    assert b["teacher_wait_share"] < 0.5
    assert last.startswith("teacher utilisation") and last.endswith("the teacher kept up")
    print(f"student-bound run: {b}")
