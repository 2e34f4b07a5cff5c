"""Run-folder assembly after training, for both engines: ``pipeline/`` from ``segments/seg-KK``, ``samples.png``,
``report.json`` and ``history.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.atomic import write_json
from o2mkd_ray.core.segments import Segments
from o2mkd_ray.distill.run_folder import finished_summary, is_conditional, is_text_to_image


def finish_run(cfg: Config, out: Path, teacher, scheduler, segments: Segments, shape, teacher_stats: dict,
               t_start: float, extra: dict | None = None) -> dict:
    """Assembles OUT/pipeline from OUT/segments/*, writes samples.png and report.json."""
    from o2mkd_ray.core.costs import forward_cost, guidance_passes, sampling_cost, scheduler_timesteps
    from o2mkd_ray.pipelines.build import load_student

    summaries = [finished_summary(out, k) for k in range(segments.n)]
    students = [load_student(out / "segments" / f"seg-{k:02d}", use_ema=True) for k in range(segments.n)]
    pipe, write, seq_len = _assemble(cfg, teacher, scheduler, segments, students, shape)
    pipe.save_pretrained(out / "pipeline", safe_serialization=True)
    seg_reports = []
    for k, (s, st) in enumerate(zip(summaries, students)):
        seg_reports.append({**{key: v for key, v in s.items() if key != "history"},
                            **forward_cost(st, shape, seq_len)})
    t0 = time.time()
    samples = write(out / "samples.png")
    samples["wall_s"] = round(time.time() - t0, 2)
    t_cost = forward_cost(teacher, shape, seq_len)
    # one sampling run of the saved pipeline's scheduler at sampling.steps, each step on its owner
    run_cost = sampling_cost([s["macs"] for s in seg_reports], t_cost["macs"], segments.boundaries,
                             scheduler_timesteps(pipe.scheduler, cfg.sampling.steps),
                             guidance_passes(cfg.sampling.guidance_scale, teacher.config)
                             if is_conditional(cfg) else 1)
    report = {
        "name": cfg.name, "out": str(out), "num_segments": segments.n, "boundaries": list(segments.boundaries),
        "segments": seg_reports, "teacher": {**teacher_stats, **t_cost}, "samples": samples,
        "macs_ratio_per_step": run_cost["macs_ratio"],
        "sampling_cost": {"scheduler": cfg.sampling.scheduler, "steps": cfg.sampling.steps, **run_cost},
        "wall_s": round(time.time() - t_start, 2), **(extra or {}),
    }
    write_json(out / "report.json", report)
    write_json(out / "history.json", {s["index"]: s.get("history", []) for s in summaries}, indent=None)
    return report


def _assemble(cfg: Config, teacher, scheduler, segments: Segments, students: list, shape):
    """The run's O2MKD pipeline of the teacher's family, the writer of its ``samples.png`` (teacher vs students)
    and the text length its costs count: unconditional, text-to-image (SD, SDXL, SD3: sharing the teacher's VAE,
    text encoder(s) and tokenizer(s)) or DiT (sharing the teacher's VAE and class names)."""
    from o2mkd_ray.core.schedulers import make_scheduler
    from o2mkd_ray.core.teacher import teacher_kind
    from o2mkd_ray.eval import sampling
    from o2mkd_ray.pipelines import build

    if teacher_kind(cfg.teacher) == "dit":
        teacher_pipe = build.teacher_dit_pipeline(cfg, teacher)
        pipe = build.build_dit_pipeline(students, segments.boundaries, teacher_pipe, cfg.sampling.scheduler)
        return pipe, lambda path: sampling.write_dit_samples(cfg, teacher_pipe, pipe, path), 77
    if is_text_to_image(cfg):
        from o2mkd_ray.core.sd3 import sd3_text_length

        teacher_pipe = build.teacher_sd_pipeline(cfg, teacher)
        pipe = build.build_sd_pipeline(students, segments.boundaries, teacher_pipe, cfg.sampling.scheduler)
        seq_len = (sd3_text_length(teacher_pipe) if teacher_kind(cfg.teacher) == "sd3"
                   else teacher_pipe.tokenizer.model_max_length)
        return (pipe, lambda path: sampling.write_sd_samples(cfg, teacher_pipe, pipe, sampling.sampling_prompts(cfg),
                                                             path), seq_len)
    sampler = make_scheduler(cfg.sampling.scheduler, scheduler.config)
    pipe = build.build_pipeline(students, segments.boundaries, sampler, cfg.data.value_range)
    return pipe, lambda path: sampling.write_samples(cfg, teacher, pipe, scheduler.config, shape, path), 77
