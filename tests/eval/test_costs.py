"""One definition of cost (``o2mkd_ray.core.costs``): a whole sampling run, each step on the student owning its
timestep, guidance as 2 passes; distill's report.json, eval and tune report the same figure for one config.

Also the shared evaluation pieces the two front ends build their reports from (image fidelity, report nulls).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from conftest import ROOT
from diffusers import DDPMScheduler

from o2mkd_ray.core.costs import (
    forward_cost,
    guidance_passes,
    sampler_timesteps,
    sampling_cost,
    scheduler_timesteps,
)

SCHEDULE = DDPMScheduler(num_train_timesteps=1000).config  # "leading" spacing, steps_offset 0
UNEVEN = [0, 150, 400, 1000]


def test_sampler_timesteps_one_entry_per_unet_call():
    assert sampler_timesteps("ddim", SCHEDULE, 4) == [750, 500, 250, 0]
    pndm = sampler_timesteps("pndm", SCHEDULE, 4)
    assert len(pndm) > 4 and len(set(pndm)) < len(pndm)  # PNDM's warm-up calls the UNet twice on a timestep
    assert sampler_timesteps("euler", SCHEDULE, 4) == [999, 666, 333, 0]  # fractional timesteps floored
    sched = DDPMScheduler.from_config(SCHEDULE)
    sched.set_timesteps(7)
    before = sched.timesteps.clone()
    assert scheduler_timesteps(sched, 4) == [750, 500, 250, 0]
    assert np.array_equal(sched.timesteps, before)  # the caller's scheduler is left as it was


def test_sampling_cost_weights_students_by_the_steps_they_take():
    # DDIM 4 steps 750, 500, 250, 0 on [0, 150) [150, 400) [400, 1000): 1, 1 and 2 steps
    macs, teacher = [10, 20, 40], 100
    c = sampling_cost(macs, teacher, UNEVEN, sampler_timesteps("ddim", SCHEDULE, 4))
    assert c["steps_per_student"] == [1, 1, 2] and c["unet_calls"] == 4 and c["passes"] == 1
    assert c["student_macs_per_run"] == [10, 20, 80]
    assert (c["o2mkd_macs_per_run"], c["teacher_macs_per_run"]) == (110, 400)
    assert c["macs_ratio"] == pytest.approx(110 / 400)  # 0.275
    unweighted = np.mean(macs) / teacher  # the old report.json figure: 0.2333
    by_length = sum(m * (b - a) for m, a, b in zip(macs, UNEVEN, UNEVEN[1:])) / (1000 * teacher)  # old tune: 0.305
    assert c["macs_ratio"] != pytest.approx(unweighted) and c["macs_ratio"] != pytest.approx(by_length)
    with pytest.raises(ValueError, match="2 student MACs for 3 segments"):
        sampling_cost([1, 2], 3, UNEVEN, [0])


def test_guidance_counts_two_passes_per_call():
    ts = sampler_timesteps("ddim", SCHEDULE, 4)
    one, two = (sampling_cost([10, 20, 40], 100, UNEVEN, ts, passes=p) for p in (1, 2))
    assert two["o2mkd_macs_per_run"] == 2 * one["o2mkd_macs_per_run"] == 220
    assert two["teacher_macs_per_run"] == 2 * one["teacher_macs_per_run"] == 800
    assert two["macs_ratio"] == one["macs_ratio"]  # both sides doubled: the ratio stays
    assert guidance_passes(7.5, {"time_cond_proj_dim": None}) == 2
    assert guidance_passes(1.0, {}) == 1 and guidance_passes(None) == 1
    assert guidance_passes(7.5, {"time_cond_proj_dim": 256}) == 1  # guidance-distilled UNet: one branch


# ------------------------------------------------------------------------------------------------------------
# distill (report.json), eval and tune agree


def _finished_run(out, overrides):
    """A run folder as training leaves it before finish_run: config.json and segments/seg-KK (EMA student and
    summary), students untrained from the teacher."""
    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.core.atomic import write_json
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import load_teacher, sample_shape

    cfg = load_config(ROOT / "pipelines" / "tiny.yaml", ["mlflow.enabled=false", *overrides])
    teacher, sched = load_teacher(cfg.teacher)
    seg = Segments.from_config(cfg.segments, sched.config.num_train_timesteps)
    out.mkdir(parents=True)
    (out / "config.json").write_text(cfg.to_json())
    for k, student in enumerate(build_students(cfg, teacher, seg.n)):
        student.save_pretrained(out / "segments" / f"seg-{k:02d}" / "ema")
        write_json(out / "segments" / f"seg-{k:02d}" / "summary.json", {"index": k, "history": []})
    return cfg, teacher, sched, seg, sample_shape(teacher, cfg.data.channels, cfg.data.resolution)


def _student_macs(out, n, shape, seq_len=77):
    from o2mkd_ray.pipelines.build import load_student

    return [forward_cost(load_student(out / "segments" / f"seg-{k:02d}"), shape, seq_len)["macs"] for k in range(n)]


def test_distill_eval_and_tune_report_the_same_cost(tiny_teacher_dir, tmp_path, monkeypatch):
    from o2mkd_ray.engine.run_folder import finish_run
    from o2mkd_ray.eval.evaluate import evaluate_run
    from o2mkd_ray.eval.fid import FID_WEIGHTS_ENV
    from o2mkd_ray.tune.trial import sampling_cost as tune_cost

    monkeypatch.delenv(FID_WEIGHTS_ENV, raising=False)
    out = tmp_path / "run"
    cfg, teacher, sched, seg, shape = _finished_run(out, [
        f"teacher.pretrained={tiny_teacher_dir}", f"segments.boundaries={json.dumps(UNEVEN)}",
        "students.width=[0.5, 1.0, 0.5]", "sampling.scheduler=ddim", "sampling.steps=4", "eval.steps=4",
        "sampling.num_images=2"])
    distill = finish_run(cfg, out, teacher, sched, seg, shape, {}, time.time())
    evaluation = evaluate_run(out, num_images=2, agreement_samples=16, num_buckets=4, num_reference=8,
                              latency_repeats=1)
    tune = tune_cost(cfg, teacher, shape)

    m = _student_macs(out, 3, shape)
    t = forward_cost(teacher, shape)["macs"]
    by_steps = (1 * m[0] + 1 * m[1] + 2 * m[2]) / (4 * t)  # DDIM 750, 500 -> student 2; 250 -> 1; 0 -> 0
    assert m[0] == m[2] < m[1] == t and by_steps != pytest.approx(np.mean(m) / t)
    saved = json.loads((out / "report.json").read_text())
    assert saved["macs_ratio_per_step"] == pytest.approx(by_steps)
    assert saved["sampling_cost"]["steps_per_student"] == [1, 1, 2]
    assert saved["sampling_cost"]["scheduler"] == "ddim" and saved["sampling_cost"]["steps"] == 4
    assert distill["macs_ratio_per_step"] == evaluation["cost"]["macs_ratio_run"] == tune["cost"]
    assert evaluation["metrics"]["macs_ratio_run"] == tune["cost"]
    assert [s["steps_in_run"] for s in evaluation["cost"]["students"]] == tune["steps_per_student"] == [1, 1, 2]


def test_text_to_image_distill_and_eval_count_guidance_alike(tiny_sd_dir, prompts_file, tmp_path, monkeypatch):
    from conftest import sd_overrides

    from o2mkd_ray.engine.run_folder import finish_run
    from o2mkd_ray.eval.evaluate import evaluate_run
    from o2mkd_ray.eval.fid import FID_WEIGHTS_ENV

    monkeypatch.delenv(FID_WEIGHTS_ENV, raising=False)
    out = tmp_path / "sd"
    cfg, teacher, sched, seg, shape = _finished_run(out, [
        *sd_overrides(tiny_sd_dir, prompts_file), "segments.boundaries=[0, 300, 1000]", "sampling.scheduler=ddim",
        "sampling.guidance_scale=7.5", "eval.steps=3"])
    distill = finish_run(cfg, out, teacher, sched, seg, shape, {}, time.time())
    evaluation = evaluate_run(out, num_images=2, latency_repeats=1)

    m, t = _student_macs(out, 2, shape), forward_cost(teacher, shape)["macs"]
    run = distill["sampling_cost"]  # DDIM 3 steps, steps_offset 1: 667, 334 -> student 1; 1 -> student 0
    assert run["steps_per_student"] == [1, 2] and run["passes"] == 2
    assert run["o2mkd_macs_per_run"] == 2 * (m[0] + 2 * m[1]) and run["teacher_macs_per_run"] == 2 * 3 * t
    assert distill["macs_ratio_per_step"] == pytest.approx((m[0] + 2 * m[1]) / (3 * t))
    cost = evaluation["cost"]
    assert cost["unet_batch_per_image"] == 2 and cost["o2mkd"]["macs_per_run"] == run["o2mkd_macs_per_run"]
    assert cost["macs_ratio_run"] == distill["macs_ratio_per_step"] == evaluation["metrics"]["macs_ratio_run"]
    assert json.loads((out / "eval" / "report.json").read_text())["cost"] == cost


# ------------------------------------------------------------------------------------------------------------
# shared evaluation pieces


def test_image_fidelity_caps_identical_images():
    from o2mkd_ray.eval.measures import PSNR_CAP_DB, image_fidelity

    a = np.zeros((3, 4, 4, 1))
    b = a.copy()
    b[1] += 0.1  # MSE 0.01: 20 dB
    f = image_fidelity(a, b)
    assert f["mse"].tolist() == pytest.approx([0.0, 0.01, 0.0])
    assert f["psnr_db"].tolist() == pytest.approx([PSNR_CAP_DB, 20.0, PSNR_CAP_DB])
    assert f["num_capped"] == 2 and f["capped"].tolist() == [True, False, True]
    assert f["psnr_min_db"] == pytest.approx(20.0) and f["mse_max"] == pytest.approx(0.01)


def test_finish_report_gives_every_null_a_reason(tmp_path):
    from o2mkd_ray.eval.report import finish_report, write_report

    report = {"latency": {"speedup": None, "teacher_s": 1.0}, "x": float("nan"), "clip": {},
              "fid": {"backend": "random-conv",
                      "a_vs_b": {"fid": None, "kid": None, "kid_std": None, "null_reason": "too few"}}}
    done = finish_report(report, {"ok": np.float32(2.0), "bad": float("inf"), "none": None},
                         {"clip": "skipped"})
    assert done["metrics"] == {"ok": 2.0}
    nulls = done["null_reasons"]
    assert nulls["latency.speedup"].startswith("O2MKD sampling time measured as 0 s")
    assert nulls["x"].startswith("not finite") and nulls["clip"] == "skipped"
    assert {nulls[f"fid.a_vs_b.{k}"] for k in ("fid", "kid", "kid_std")} == {"too few"}
    written = write_report(tmp_path, done, [tmp_path / "plot.png"], markdown="# hi\n")
    assert [p.split("/")[-1] for p in written["files"]] == ["report.md", "report.json", "plot.png"]
    on_disk = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda c: math.nan)
    assert on_disk == written and (tmp_path / "report.md").read_text() == "# hi\n"
