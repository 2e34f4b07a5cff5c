"""Sampling cost: the teacher against O2MKD students, same scheduler, steps and noise, by batch size, in one process.

What it measures: the wall time of one whole DDIM sampling run (``--steps`` steps) at each ``--batches`` size, for
the teacher and for N students of width ``--width`` (``students.build_student``; each step run by the student
whose segment holds its timestep), under each acceleration mode of ``--modes``:

  off            no option (images bit-identical to diffusers)
  channels_last  ``pipe.accelerate(channels_last=True)``
  compile        ``pipe.accelerate(compile=True)`` (one ``torch.compile`` wrapper per student; tens of seconds
                 to minutes of compilation per graph and batch shape on CPU, in the warm-up)
  both           ``pipe.accelerate(compile=True, channels_last=True)``
  frozen         ``pipe.accelerate(compile=True, compile_kwargs={"options": {"freezing": True}})`` (inductor
                 freezing: lets inductor fold and pre-pack the weights; not default: it compiled no faster
                 sampling than ``compile`` here, see docs/sampling.md)

The teacher always gets the same options as the students, so that the ratio stays fair. ``--pipeline``:

  unconditional  google/ddpm-cifar10-32's UNet: O2MKDPipeline over the teacher alone (the students' sampling
                 loop, so the ratio isolates the network cost) vs O2MKDPipeline over the students
  t2i            an SD-1.x-like UNet at a fifth of its width, 32x32 latents (compute-bound): diffusers'
                 StableDiffusionPipeline vs O2MKDStableDiffusionPipeline, guidance 7.5, denoising loop only

Random weights (only the timing matters). Per batch size, each repetition runs every (network, mode) once in a
rotated order (interleaved), after one warm-up run of each; medians are reported, and the efficiency of the
fastest reps (load spikes on a shared machine only ever add time). torch.compile's caches are reset between
batch sizes (dynamic=False: one graph per batch shape anyway). MACs: ``o2mkd_ray.core.costs.count_macs``
(batch 1), per step averaged over the students the run visits.

efficiency = wall-time speedup (teacher / students) / MACs speedup (teacher MACs / student MACs per step).
Targets (CPU, unconditional): >= 0.9 at batch 16, >= 0.8 at batch 4. ``max_abs_diff``: images of the mode
vs ``off`` (max over teacher and students). ``gain_cpu``: students' CPU time off / in the mode.
``efficiency_cpu`` uses the process's CPU time instead of wall time: on a busy shared machine the time spent
waiting for a core inflates wall times at random, CPU time much less (with ``--threads 1`` it is the compute).

``--profile FILE.md``: after timing each batch size, one profiled run of every pipeline (ops grouped into conv,
matmul, copies, other ops, compiled, python; step and routing overhead; see ``sampling_profile.py``), written
to FILE.md with the timing table.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sampling.py --threads 1 --steps 2 --reps 5
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sampling.py --threads 1 --modes off,channels_last \\
        --profile docs/sampling.md
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sampling.py --pipeline t2i --batches 1,4 --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sampling.py --batches 4 --steps 2 --reps 1  # smoke
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sampling_builds import MODES, build_t2i, build_unconditional


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--pipeline", choices=("unconditional", "t2i"), default="unconditional")
    p.add_argument("--batches", default="1,4,16,64", help="batch sizes, comma-separated (default 1,4,16,64)")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per run (default 10)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of each variant (default 3)")
    p.add_argument("--width", default="0.5",
                   help="student width: one value, or one per segment comma-separated (0 = low-noise end)")
    p.add_argument("--n", type=int, default=3, help="number of students / segments (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--modes", default="off,channels_last,compile,both",
                   help=f"acceleration modes, comma-separated, among {', '.join(MODES)} (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=Path, default=None, help="profile every pipeline; write the summary here")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def load() -> str:
    """The 1, 5 and 15 minute load averages (the machine may be shared: read the figures against them)."""
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def modes_of(text: str) -> list[str]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODES]
    if unknown or not names:
        sys.exit(f"--modes: unknown {unknown or 'empty'}; use {', '.join(MODES)}")
    return ["off"] + [m for m in names if m != "off"]  # off: the reference for max_abs_diff and gain


def time_batch(pipes: dict, run, batch: int, args) -> tuple[dict, dict, dict]:
    """Interleaved, rotated repetitions of every variant at one batch size; returns (wall times, CPU times,
    first images)."""
    for pipe in pipes.values():  # warm-up: allocator, kernels, and compilation of every student the timed run visits
        run(pipe, batch, args.steps, args.seed)  # same timesteps as timed
    names = list(pipes)
    times: dict = {name: [] for name in names}
    cpu: dict = {name: [] for name in names}
    images: dict = {}
    for r in range(args.reps):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate: no variant always first
            (dt, dc), img = run(pipes[name], batch, args.steps, args.seed)
            times[name].append(dt)
            cpu[name].append(dc)
            images.setdefault(name, img)
        print(f"  batch {batch} rep {r + 1}/{args.reps} (load {load()}): " + ", ".join(
            f"{n}/{m} {times[(n, m)][-1]:.2f}s (cpu {cpu[(n, m)][-1]:.2f}s)" for n, m in names), flush=True)
    return times, cpu, images


def summarize(times: dict, cpu: dict, images: dict, batch: int, macs_speedup: float) -> list[dict]:
    """One row per mode: medians, speedup, efficiency (wall, fastest reps, CPU time), gain over off, and the
    image difference from off."""
    import numpy as np

    rows = []
    med = statistics.median
    for mode in [m for m in MODES if ("teacher", m) in times]:
        t, s = (med(times[(n, mode)]) for n in ("teacher", "students"))
        t_min, s_min = (min(times[(n, mode)]) for n in ("teacher", "students"))
        t_cpu, s_cpu = (med(cpu[(n, mode)]) for n in ("teacher", "students"))
        rows.append({
            "batch": batch, "mode": mode, "teacher_s": t, "students_s": s, "speedup": t / s,
            "efficiency": t / s / macs_speedup, "efficiency_min": t_min / s_min / macs_speedup,
            "efficiency_cpu": t_cpu / s_cpu / macs_speedup,
            "gain_cpu": med(cpu[("students", "off")]) / s_cpu,
            "max_abs_diff": max(float(np.abs(images[(n, mode)] - images[(n, "off")]).max())
                                for n in ("teacher", "students")),
            "load1": os.getloadavg()[0],
        })
    return rows


def profile_batch(pipes: dict, run, batch: int, args, conv_per_image: dict) -> list[dict]:
    """One profiled run and one hooked run (uncompiled modes) of every pipeline at this batch size."""
    from sampling_profile import hook_overheads, profile_run

    rows = []
    for (name, mode), pipe in pipes.items():
        r = {"batch": batch, "network": name, "mode": mode, **profile_run(pipe, run, batch, args.steps, args.seed)}
        r["conv_gmacs_s"] = conv_per_image[name] * batch * args.steps / max(r["conv"], 1e-9) / 1e9
        if not MODES[mode].get("compile"):
            r.update(hook_overheads(pipe, pipe.unet if hasattr(pipe, "unet") else pipe.students, run, batch,
                                    args.steps, args.seed))
        rows.append(r)
    return rows


def conv_macs_per_image(pipes: dict, args, cost: dict) -> dict:
    """Convolution MACs of one UNet call per image (x2 with guidance: the UNet batch is 2B)."""
    from sampling_profile import conv_macs

    out = {}
    for name in ("teacher", "students"):
        unet = pipes[(name, "off")].unet if args.pipeline == "t2i" else pipes[(name, "off")].students
        if not hasattr(unet, "student"):
            nets = [unet]
        else:  # the teacher's MultiStudentUNet has one student; the students' run visits cost["owners"]
            nets = [unet.student(k if name == "students" else 0) for k in cost["owners"]]
        kw = {}
        if args.pipeline == "t2i":
            import torch
            kw["encoder_hidden_states"] = torch.zeros(1, 77, nets[0].config.cross_attention_dim)
        c = nets[0].config
        macs = statistics.fmean(conv_macs(n, (1, c.in_channels, c.sample_size, c.sample_size), **kw) for n in nets)
        out[name] = macs * (2 if args.pipeline == "t2i" else 1)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    import pandas as pd
    import torch

    torch.set_num_threads(args.threads)
    # every UNet of a class shares Dynamo's per-function graph limit (8): per batch size compile/both take one
    # graph per network and layout, frozen one per network and student visited
    torch._dynamo.config.recompile_limit = 64
    batches = [int(b) for b in args.batches.split(",")]
    modes = modes_of(args.modes)
    print(f"torch threads: {torch.get_num_threads()} (--threads {args.threads}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {os.cpu_count()} cores)  torch "
          f"{torch.__version__}; load average {load()}")
    build = build_t2i if args.pipeline == "t2i" else build_unconditional
    pipes, cost, run = build(args, modes)
    macs_speedup = 1.0 / cost["macs_ratio"]  # teacher MACs / student MACs per step
    print(f"teacher: {cost['shape']}, {cost['teacher_params'] / 1e6:.1f} M params, "
          f"{cost['teacher_macs'] / 1e9:.3f} GMACs/image; students (N={args.n}): channels "
          f"{cost['student_configs']}, {[round(m / 1e9, 3) for m in cost['student_macs']]} GMACs/image")
    print(f"timesteps {cost['timesteps']} -> students {cost['owners']}; MACs speedup {macs_speedup:.2f}x; "
          f"modes {modes}")
    conv_per_image = conv_macs_per_image(pipes, args, cost) if args.profile else {}

    rows, prof_rows, all_times = [], [], {}
    for batch in batches:
        torch._dynamo.reset()  # one batch shape's graphs at a time
        times, cpu, images = time_batch(pipes, run, batch, args)
        all_times[batch] = {f"{n}/{m}": {"wall": v, "cpu": cpu[(n, m)]} for (n, m), v in times.items()}
        rows += summarize(times, cpu, images, batch, macs_speedup)
        if args.profile:
            prof_rows += profile_batch(pipes, run, batch, args, conv_per_image)
        if args.json:  # after every batch size: a long run stopped early still leaves its figures
            write_json(args.json, {"partial": True, "table": rows, "profile": prof_rows, "times_s": all_times})
    table = pd.DataFrame(rows).set_index(["batch", "mode"])
    with pd.option_context("display.width", 200, "display.max_columns", 20,
                           "display.float_format", "{:.3g}".format):
        print(table)
    footer = (f"efficiency = speedup / MACs speedup ({macs_speedup:.2f}x); targets: >= 0.9 at batch 16, >= 0.8 at "
              f"batch 4 ({args.pipeline}, {args.steps} steps, {args.reps} reps, {torch.get_num_threads()} threads, "
              f"load average {load()} at the end)")
    print(footer)
    result = {"pipeline": args.pipeline, "batches": batches, "steps": args.steps, "reps": args.reps,
              "widths": str(args.width), "n": args.n, "modes": modes, "threads": torch.get_num_threads(),
              "cores": os.cpu_count(), "torch": torch.__version__, "macs_speedup": macs_speedup, **cost,
              "times_s": all_times, "table": table.reset_index().to_dict(orient="records"), "profile": prof_rows}
    if args.profile:
        write_profile(args, table, prof_rows, footer, macs_speedup)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return result


def write_json(path: Path, obj: dict) -> None:
    from o2mkd_ray.core.atomic import write_json as atomic_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_json(path, obj, default=float)


def write_profile(args, table, prof_rows: list[dict], footer: str, macs_speedup: float) -> None:
    """The profile as this pipeline's section of ``--profile`` (between its markers; the rest of the file, e.g.
    a written conclusion, is kept; appended when the file has no such section yet)."""
    from sampling_profile import markdown

    from o2mkd_ray.core.atomic import write_text

    cmd = "python benchmarks/bench_sampling.py " + " ".join(sys.argv[1:])
    head = (f"### {args.pipeline}: measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            f"    {cmd}\n\n{footer}\n\n" + table.to_markdown(floatfmt=".3g") + "\n")
    begin, end = f"<!-- profile:{args.pipeline} -->", f"<!-- /profile:{args.pipeline} -->"
    act_speedup = 1 / statistics.fmean(float(w) for w in str(args.width).split(","))
    section = f"{begin}\n{markdown(prof_rows, head, macs_speedup, act_speedup)}{end}"
    old = args.profile.read_text() if args.profile.exists() else ""
    if begin in old and end in old:
        text = old[:old.index(begin)] + section + old[old.index(end) + len(end):]
    else:
        text = (old.rstrip() + "\n\n" if old.strip() else "") + section + "\n"
    write_text(args.profile, text)
    print(f"wrote {args.profile}")


if __name__ == "__main__":
    main()
