"""Sampling cost: the teacher against O2MKD students, same scheduler, steps, batch and noise, in one process.

What it measures: the wall time of one whole DDIM sampling run (``--batch`` images, ``--steps`` steps) for

  teacher_o2mkd  O2MKDPipeline whose only "student" is the teacher itself (the students' sampling loop, so
                 the ratio against ``students`` isolates the network cost)
  teacher_ddim   diffusers' DDIMPipeline on the teacher (reference: the stock loop; the same images as
                 teacher_o2mkd)
  students       O2MKDPipeline over N students of width ``--width`` (``students.build_student``), each step
                 run by the student whose segment holds its timestep

on the google/ddpm-cifar10-32 UNet shape (random weights: only the timing matters). Each repetition runs every
variant once, in a rotated order (interleaved), after one warm-up run of each; medians are reported. MACs come
from ``o2mkd_ray.core.costs.count_macs`` (batch 1), per step averaged over the students the run visits.

Target: speedup (teacher_o2mkd time / students time) >= 0.85 x (teacher MACs / student MACs) at batch 16 on
CPU, i.e. the printed ``efficiency`` = speedup / (teacher MACs / student MACs) >= 0.85.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sampling.py           # batch 16, 10 steps, 3 reps
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sampling.py --steps 2 --reps 1 --batch 4   # smoke
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--batch", type=int, default=16, help="images per sampling run (default 16)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per run (default 10)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each variant (default 3)")
    p.add_argument("--width", default="0.5",
                   help="student width: one value, or one per segment comma-separated (0 = low-noise end)")
    p.add_argument("--n", type=int, default=3, help="number of students / segments (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--no-ddim", action="store_true", help="skip the DDIMPipeline reference")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def build(args):
    """The teacher, the students and the pipelines to time, plus the MACs of each network."""
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

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
    pipes = {
        "teacher_o2mkd": O2MKDPipeline(students=MultiStudentUNet([teacher], boundaries=whole),
                                       scheduler=sched()),
        "students": O2MKDPipeline(students=MultiStudentUNet(students, boundaries=segments.boundaries),
                                  scheduler=sched()),
    }
    if not args.no_ddim:
        pipes["teacher_ddim"] = DDIMPipeline(unet=teacher, scheduler=sched())
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)

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


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()} (--threads {args.threads}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {os.cpu_count()} cores)  torch "
          f"{torch.__version__}")
    pipes, cost, segments, widths = build(args)
    print(f"teacher: google/ddpm-cifar10-32 shape, {cost['teacher_params'] / 1e6:.1f} M params, "
          f"{cost['teacher_macs'] / 1e9:.3f} GMACs/image; students (N={len(widths)}, boundaries "
          f"{list(segments.boundaries)}): widths {widths}, channels {cost['student_configs']}, "
          f"{[round(m / 1e9, 3) for m in cost['student_macs']]} GMACs/image")
    print(f"DDIM timesteps {cost['timesteps']} -> students {cost['owners']}")

    # warm-up: one short run of each (allocator, kernels, first-call lazy init)
    for name, pipe in pipes.items():
        run_once(pipe, args.batch, min(args.steps, 2), args.seed)
    times: dict[str, list[float]] = {name: [] for name in pipes}
    images = {}
    names = list(pipes)
    for r in range(args.reps):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate: no variant always goes first
        for name in order:
            dt, img = run_once(pipes[name], args.batch, args.steps, args.seed)
            times[name].append(dt)
            images.setdefault(name, img)
        print(f"rep {r + 1}/{args.reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True)

    rows = []
    for name in names:
        med = statistics.median(times[name])
        macs = cost["teacher_macs"] if name.startswith("teacher") else cost["student_macs_per_step"]
        rows.append({"variant": name, "median_s": med, "min_s": min(times[name]),
                     "ms_per_step": 1000 * med / args.steps, "images_per_s": args.batch / med,
                     "gmacs_per_step": macs * args.batch / 1e9,
                     "reps_s": " ".join(f"{t:.2f}" for t in times[name])})
    table = pd.DataFrame(rows).set_index("variant")
    med = table["median_s"]
    speedup = med["teacher_o2mkd"] / med["students"]
    macs_speedup = 1.0 / cost["macs_ratio"]  # teacher MACs / student MACs per step
    efficiency = speedup / macs_speedup
    speedup_min = table["min_s"]["teacher_o2mkd"] / table["min_s"]["students"]  # fastest reps: less noise
    result = {
        "batch": args.batch, "steps": args.steps, "reps": args.reps, "widths": widths, "n": len(widths),
        "threads": torch.get_num_threads(), "cores": os.cpu_count(), "torch": torch.__version__,
        "times_s": times, "table": table.reset_index().to_dict(orient="records"), **cost,
        "speedup": speedup, "macs_speedup": macs_speedup, "efficiency": efficiency,
        "speedup_min": speedup_min, "efficiency_min": speedup_min / macs_speedup,
        "target_efficiency": 0.85, "meets_target": bool(efficiency >= 0.85),
    }
    if "teacher_ddim" in med:
        result["speedup_vs_ddim_pipeline"] = med["teacher_ddim"] / med["students"]
        result["teacher_o2mkd_vs_ddim_images_max_abs_diff"] = float(
            np.abs(images["teacher_o2mkd"] - images["teacher_ddim"]).max())

    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.3f}".format):
        print(table)
    print(f"MACs ratio (student/teacher per step, over the students this run visits): "
          f"{cost['macs_ratio']:.4f} -> MACs speedup {macs_speedup:.2f}x")
    print(f"wall-time speedup teacher_o2mkd / students: {speedup:.2f}x (medians; from the fastest reps "
          f"{speedup_min:.2f}x, efficiency {speedup_min / macs_speedup:.3f})")
    if "speedup_vs_ddim_pipeline" in result:
        print(f"wall-time speedup teacher_ddim / students: {result['speedup_vs_ddim_pipeline']:.2f}x  "
              f"(teacher_o2mkd vs DDIMPipeline images: max |diff| "
              f"{result['teacher_o2mkd_vs_ddim_images_max_abs_diff']:.2e})")
    print(f"efficiency = speedup / MACs speedup = {efficiency:.3f}  (target >= 0.85 at batch 16: "
          f"{'MET' if result['meets_target'] else 'NOT MET'}; batch {args.batch}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=float))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
