"""What a fresh Ray worker process pays before it can train: the CPU seconds of its imports.

Every segment's Train worker (and the teacher actor) is a new Python process that imports torch, Ray Train and
diffusers before the first step; on a machine with few cores those imports, not Ray's scheduling, are most of the
Ray engine's fixed cost (``report.json`` -> ``worker_startup_s``). Each module set below is imported in a fresh
interpreter, the sets interleaved over ``--reps`` rounds; the table gives the median user+system CPU seconds and
wall seconds of each, the baseline interpreter's subtracted.

    .venv/bin/python benchmarks/import_cost.py --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETS = {
    "python (baseline)": "pass",
    "torch": "import torch",
    "ray.train.torch": "import ray.train.torch",
    "diffusers UNets + schedulers": "import diffusers.models.unets.unet_2d, diffusers.models.unets.unet_2d_condition, "
                                    "diffusers.schedulers",
    "diffusers.training_utils (EMAModel)": "import diffusers.training_utils",
    "o2mkd_ray.engine.train_loop (a worker)": "import ray.train.torch, o2mkd_ray.engine.train_loop",
    "o2mkd_ray.engine.teacher_service (teacher)": "import o2mkd_ray.engine.teacher_service",
}


def measure(code: str) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of a fresh interpreter running ``code``."""
    t0, r0 = time.perf_counter(), os.times()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    r1 = os.times()
    return (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system), time.perf_counter() - t0


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the raw figures here")
    args = p.parse_args(argv)
    raw: dict[str, list[tuple[float, float]]] = {k: [] for k in SETS}
    for _ in range(args.reps):  # interleaved: every set once per round
        for name, code in SETS.items():
            raw[name].append(measure(code))
    base_cpu = statistics.median(c for c, _ in raw["python (baseline)"])
    print(f"{'imports':45s} {'CPU s':>7s} {'wall s':>7s}   (medians of {args.reps}, baseline subtracted, "
          f"{os.cpu_count()} cores)")
    table = {}
    for name, xs in raw.items():
        cpu = statistics.median(c for c, _ in xs) - (0 if name.startswith("python") else base_cpu)
        wall = statistics.median(w for _, w in xs)
        table[name] = {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2)}
        print(f"{name:45s} {cpu:7.2f} {wall:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reps": args.reps, "table": table, "raw": raw}, f, indent=1)
    return table


if __name__ == "__main__":
    main()
