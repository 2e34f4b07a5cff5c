"""What a fresh Ray worker process pays before it can train: the CPU seconds of its imports.

Every segment's Train worker (and the teacher actor) is a new Python process that imports torch, Ray Train and
diffusers before the first step; on a machine with few cores those imports, not Ray's scheduling, are most of the
Ray engine's fixed cost (``report.json`` -> ``worker_startup_s``). Each module set below is imported in a fresh
interpreter, the sets interleaved over ``--reps`` rounds; the table gives the median user+system CPU seconds and
wall seconds of each, the baseline interpreter's subtracted.

    .venv/bin/python benchmarks/import_cost.py --reps 3
    .venv/bin/python benchmarks/import_cost.py --reps 2 --trainers 3     # + the floor of bare TorchTrainers

``--trainers N`` adds the floor that no code of ours is in: N bare ``TorchTrainer``s (one worker each, 0.25 CPU,
a train loop that returns at once) fitted side by side on a fresh 2-CPU local Ray, as the Ray engine fits one per
segment. It prints the wall time of the N ``fit()`` calls and the Ray actors they started, by class (Ray's state
API): besides each worker, Ray Train starts a controller and helper actors per trainer, each a new Python process
that imports Ray Train (and the controller, torch).
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
    "ray.train (a Ray Train helper actor)": "import ray.train",
}

# N bare TorchTrainers fitted side by side in a fresh interpreter; prints one JSON line
_TRAINERS = """
import json, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.util.state import list_actors
n = int(sys.argv[1])
ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", configure_logging=False,
         _temp_dir=tempfile.mkdtemp(prefix="o2r-ic-"))
storage = tempfile.mkdtemp(prefix="o2mkd-ic-")
def fit(k):
    t = TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.25}),
                     run_config=RunConfig(name=f"bare-{k}", storage_path=storage))
    t0 = time.perf_counter()
    t.fit()
    return time.perf_counter() - t0
t0 = time.perf_counter()
with ThreadPoolExecutor(n) as pool:
    fits = list(pool.map(fit, range(n)))
wall = time.perf_counter() - t0
classes = Counter(a.class_name for a in list_actors(limit=10_000, raise_on_missing_output=False))
ray.shutdown()
print(json.dumps({"wall_s": wall, "fit_s": fits, "actors": dict(classes)}))
"""


def bare_trainers(n: int) -> dict:
    """Wall time and actors of ``n`` bare TorchTrainers fitted side by side (see the module docstring)."""
    env = {**os.environ, "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # as the Ray engine sets it (engine/driver.py)
    r = subprocess.run([sys.executable, "-c", _TRAINERS, str(n)], check=True, capture_output=True, text=True,
                       env=env)
    return json.loads(r.stdout.strip().splitlines()[-1])


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
    p.add_argument("--trainers", type=int, default=0,
                   help="also fit this many bare TorchTrainers side by side, --reps times (0: skip)")
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
    bare = []
    for _ in range(args.reps if args.trainers else 0):
        bare.append(bare_trainers(args.trainers))
        b = bare[-1]
        print(f"{args.trainers} bare TorchTrainers side by side: wall {b['wall_s']:.1f} s (fit() each "
              f"{', '.join(f'{x:.1f}' for x in b['fit_s'])} s); Ray actors started: {b['actors']}")
    if bare:
        print(f"median wall of {args.trainers} bare TorchTrainers: "
              f"{statistics.median(b['wall_s'] for b in bare):.1f} s over {len(bare)} rep(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"reps": args.reps, "table": table, "raw": raw, "bare_trainers": bare}, f, indent=1)
    return table


if __name__ == "__main__":
    main()
