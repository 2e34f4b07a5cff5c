"""Sampling cost: the teacher against O2MKD students, same scheduler, steps and noise, by batch size, in one process.

What it measures: the wall time of one whole DDIM sampling run (``--steps`` steps) at each ``--batches`` size for

  teacher   O2MKDPipeline whose only "student" is the teacher itself (the students' sampling loop, so the
            ratio against ``students`` isolates the network cost; its images equal DDIMPipeline's, see
            tests/pipelines)
  students  O2MKDPipeline over N students of width ``--width`` (``students.build_student``), each step run by
            the student whose segment holds its timestep

each with the acceleration options off and on (``--options``, default ``channels_last``; ``compile`` adds
``torch.compile`` per student, tens of seconds to minutes per graph and batch shape on CPU). The teacher gets
the same options as the students so that the ratio stays fair. Shape: google/ddpm-cifar10-32 (random weights:
only the timing matters). Per batch size, each repetition runs every variant once in a rotated order
(interleaved), after one warm-up run of each; medians are reported. MACs: ``o2mkd_ray.core.costs.count_macs``
(batch 1), per step averaged over the students the run visits.

efficiency = wall-time speedup (teacher / students) / MACs speedup (teacher MACs / student MACs per step).
Targets (CPU): >= 0.9 at batch 16, >= 0.8 at batch 4. ``max_abs_diff``: images with the options on vs off.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sampling.py --threads 2       # batches 1,4,16,64
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sampling.py --batches 4 --steps 2 --reps 1   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# google/ddpm-cifar10-32 unet/config.json (diffusers UNet2DModel, 35.7 M parameters); attention_head_dim is
# null there: one head per attention block
CIFAR10_DDPM_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", freq_shift=1, flip_sin_to_cos=False,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(128, 256, 256, 256), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
    add_attention=True,
)
# its scheduler_config.json: DDPM, 1000 steps, linear betas 1e-4..0.02, clip_sample true
CIFAR10_DDPM_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                              beta_schedule="linear", clip_sample=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--batches", default="1,4,16,64", help="batch sizes, comma-separated (default 1,4,16,64)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per run (default 10)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each variant (default 3)")
    p.add_argument("--width", default="0.5",
                   help="student width: one value, or one per segment comma-separated (0 = low-noise end)")
    p.add_argument("--n", type=int, default=3, help="number of students / segments (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--options", default="channels_last",
                   help="acceleration options for the 'on' variants: channels_last, compile, or both comma-"
                        "separated; 'none' times the options-off variants only (default channels_last)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def options(text: str) -> dict:
    """``--options`` as ``accelerate`` keyword arguments ({} for 'none')."""
    names = {o.strip() for o in text.split(",") if o.strip() and o.strip() != "none"}
    unknown = names - {"channels_last", "compile"}
    if unknown:
        sys.exit(f"--options: unknown {sorted(unknown)}; use channels_last, compile or none")
    return {name: True for name in sorted(names)}


def build(args):
    """The teacher, the students and the pipelines to time, plus the MACs of each network."""
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    from o2mkd_ray import MultiStudentUNet, O2MKDPipeline, Segments
    from o2mkd_ray.core.costs import count_macs, count_params
    from o2mkd_ray.core.students import build_student

    widths = [float(w) for w in str(args.width).split(",")]
    if len(widths) == 1:
        widths *= args.n
    if len(widths) != args.n:
        sys.exit(f"--width: got {len(widths)} values for --n {args.n}; give one value or {args.n}")

    torch.manual_seed(args.seed)
    teacher = UNet2DModel(**CIFAR10_DDPM_UNET).eval()
    segments = Segments.uniform(num_train_timesteps=CIFAR10_DDPM_SCHEDULER["num_train_timesteps"], n=args.n)
    students = [build_student(teacher, width=w).eval() for w in widths]  # channel-sliced teacher weights

    def sched():  # one scheduler per pipeline: set_timesteps keeps state
        return DDIMScheduler(**CIFAR10_DDPM_SCHEDULER)

    whole = (0, segments.boundaries[-1])  # one segment: the teacher owns every timestep
    opts = options(args.options)
    pipes = {}
    for mode in (["off", "on"] if opts else ["off"]):
        # the "on" pipelines get their own copies: the memory layout is set on the modules themselves
        t_net, s_nets = (teacher, students) if mode == "off" else copy.deepcopy((teacher, students))
        for name, multi in (("teacher", MultiStudentUNet([t_net], boundaries=whole)),
                            ("students", MultiStudentUNet(s_nets, boundaries=segments.boundaries))):
            pipe = O2MKDPipeline(students=multi, scheduler=sched())
            pipe.set_progress_bar_config(disable=True)
            pipes[(name, mode)] = pipe.accelerate(**opts) if mode == "on" else pipe

    # MACs per step of the run: the owner of each DDIM timestep, averaged over the steps
    probe = sched()
    probe.set_timesteps(args.steps)
    owners = [int(segments.owner(int(t))) for t in probe.timesteps]
    t_macs = count_macs(teacher)
    s_macs = [count_macs(s) for s in students]
    visited = [s_macs[k] for k in owners]
    cost = {
        "teacher_macs": t_macs, "teacher_params": count_params(teacher),
        "student_macs": s_macs, "student_params": [count_params(s) for s in students],
        "student_configs": [list(s.config.block_out_channels) for s in students],
        "timesteps": [int(t) for t in probe.timesteps], "owners": owners,
        "student_macs_per_step": statistics.fmean(visited),
        "macs_ratio": statistics.fmean(visited) / t_macs,  # student / teacher, per step
    }
    return pipes, cost, segments, widths


def run_once(pipe, batch: int, steps: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    images = pipe(batch_size=batch, generator=g, num_inference_steps=steps, output_type="np").images
    return time.perf_counter() - t0, images


def time_batch(pipes: dict, batch: int, args) -> tuple[dict, dict]:
    """Interleaved, rotated repetitions of every variant at one batch size; returns (times, first images)."""
    for pipe in pipes.values():  # warm-up (allocator, kernels, compilation for this batch shape)
        run_once(pipe, batch, min(args.steps, 2), args.seed)
    names = list(pipes)
    times: dict = {name: [] for name in names}
    images: dict = {}
    for r in range(args.reps):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: no variant always first
            dt, img = run_once(pipes[name], batch, args.steps, args.seed)
            times[name].append(dt)
            images.setdefault(name, img)
        print(f"  batch {batch} rep {r + 1}/{args.reps}: "
              + ", ".join(f"{n}/{m} {times[(n, m)][-1]:.2f}s" for n, m in names), flush=True)
    return times, images


def summarize(times: dict, images: dict, batch: int, macs_speedup: float) -> list[dict]:
    """One row per options mode: medians, speedup, efficiency, and the on-vs-off image difference."""
    import numpy as np

    rows = []
    for mode in sorted({m for _, m in times}, key=["off", "on"].index):
        t, s = (statistics.median(times[(n, mode)]) for n in ("teacher", "students"))
        # fastest reps too: on a shared machine, load spikes only ever add time
        t_min, s_min = (min(times[(n, mode)]) for n in ("teacher", "students"))
        row = {"batch": batch, "options": mode, "teacher_s": t, "students_s": s, "speedup": t / s,
               "efficiency": t / s / macs_speedup, "efficiency_min": t_min / s_min / macs_speedup}
        if mode == "on":
            row["max_abs_diff"] = max(float(np.abs(images[(n, "on")] - images[(n, "off")]).max())
                                      for n in ("teacher", "students"))
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"torch threads: {torch.get_num_threads()} (--threads {args.threads}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {os.cpu_count()} cores)  torch "
          f"{torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    pipes, cost, segments, widths = build(args)
    macs_speedup = 1.0 / cost["macs_ratio"]  # teacher MACs / student MACs per step
    print(f"teacher: google/ddpm-cifar10-32 shape, {cost['teacher_params'] / 1e6:.1f} M params, "
          f"{cost['teacher_macs'] / 1e9:.3f} GMACs/image; students (N={len(widths)}, boundaries "
          f"{list(segments.boundaries)}): widths {widths}, channels {cost['student_configs']}, "
          f"{[round(m / 1e9, 3) for m in cost['student_macs']]} GMACs/image")
    print(f"DDIM timesteps {cost['timesteps']} -> students {cost['owners']}; MACs speedup {macs_speedup:.2f}x; "
          f"options on: {options(args.options) or 'none'}")

    rows, all_times = [], {}
    for batch in batches:
        times, images = time_batch(pipes, batch, args)
        all_times[batch] = {f"{n}/{m}": v for (n, m), v in times.items()}
        rows += summarize(times, images, batch, macs_speedup)
    table = pd.DataFrame(rows).set_index(["batch", "options"])
    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.3g}".format):
        print(table)
    print(f"efficiency = speedup / MACs speedup ({macs_speedup:.2f}x); targets: >= 0.9 at batch 16, >= 0.8 at "
          f"batch 4 ({args.steps} steps, {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f} at the end)")
    result = {"batches": batches, "steps": args.steps, "reps": args.reps, "widths": widths, "n": len(widths),
              "options": options(args.options), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
              "torch": torch.__version__, "macs_speedup": macs_speedup, **cost, "times_s": all_times,
              "table": table.reset_index().to_dict(orient="records")}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
