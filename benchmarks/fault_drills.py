"""Fault drills: kill a train worker, the teacher actor, and the driver during real `o2mkd-ray distill` runs.

Each drill runs the real console entry point in a subprocess (a fresh local Ray each time) with one of the
test-only ``debug.*`` switches (docs/validation.md, "Rehearsing failures"), then reads the run's report.json and
history.json. One line per drill: passed or not, steps lost, wall time.

    python benchmarks/fault_drills.py                      # pipelines/tiny.yaml on a generated tiny teacher
    python benchmarks/fault_drills.py --embedded           # pipelines/digits.yaml on the embedded digits teacher
    python benchmarks/fault_drills.py --drills worker,driver --steps 60 --every 20

Steps lost: worker drill = step at the kill − step resumed from (at most one checkpoint interval); teacher drill =
steps redone by any segment (0 when the client retries carried every segment through the restart); driver drill =
checkpointed steps redone after the rerun (0 when each segment resumes at its newest checkpoint) — the steps a
worker ran after its last checkpoint before the driver died are lost too, fewer than ``--every``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tiny_teacher(path: Path) -> Path:
    """The tests' tiny UNet2DModel teacher (block_out_channels (4, 8), 8x8, 1 channel) with a DDPM scheduler."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                       norm_num_groups=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


def _distill(config: str, out: Path, sets: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # always a fresh local Ray: the drills kill processes
    cmd = [sys.executable, "-m", "o2mkd_ray.cli", "distill", config, "--out", str(out), "--no-eval",
           *[a for s in sets for a in ("--set", s)]]
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=timeout)
    return r, time.time() - t0


def _read(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "report.json").read_text()), json.loads((out / "history.json").read_text())


def _tail(r: subprocess.CompletedProcess) -> str:
    return (r.stderr.strip().splitlines() or ["(no stderr)"])[-1][:200]


def drill_worker(config: str, base: list[str], work: Path, steps: int, every: int, timeout: float) -> dict:
    """Segment 1's rank-0 worker os._exit(1)s once, mid-interval; Ray Train restarts it from its last checkpoint."""
    out, marker = work / "worker", work / "worker.killed"
    kill_at = every * (steps // every // 2) + every // 2  # middle of an interval, about half way
    r, wall = _distill(config, out, [*base, f"debug.kill_worker={{segment: 1, rank: 0, step: {kill_at}, "
                                            f"marker: '{marker}'}}"], timeout)
    if r.returncode != 0 or not marker.exists():
        return {"passed": False, "wall_s": wall, "detail": f"rc={r.returncode} marker={marker.exists()} {_tail(r)}"}
    rep, hist = _read(out)
    seg = next(s for s in rep["segments"] if s["index"] == 1)
    lost = int(marker.read_text()) - seg["resumed_from"]
    ok = (all(s["steps"] == steps for s in rep["segments"]) and 0 < seg["resumed_from"] <= kill_at
          and lost <= every and hist["1"][0]["step"] == seg["resumed_from"] + every)
    return {"passed": ok, "wall_s": wall, "steps_lost": lost,
            "detail": f"killed at step {kill_at}, resumed from {seg['resumed_from']}"}


def drill_teacher(config: str, base: list[str], work: Path, steps: int, every: int, timeout: float) -> dict:
    """The teacher actor os._exit(1)s once after N requests; Ray restarts it (max_restarts), clients retry."""
    out, marker = work / "teacher", work / "teacher.killed"
    n = max(10, steps)  # ~a third of the way through with 3 segments
    r, wall = _distill(config, out, [*base, f"debug.kill_teacher_after_requests={n}", f"debug.marker={marker}"],
                       timeout)
    if r.returncode != 0 or not marker.exists():
        return {"passed": False, "wall_s": wall, "detail": f"rc={r.returncode} marker={marker.exists()} {_tail(r)}"}
    rep, _ = _read(out)
    lost = sum(s["resumed_from"] for s in rep["segments"])  # > 0 only if a segment had to restart
    after = rep["teacher"]["requests"]  # counted by the restarted actor: requests served after the crash
    ok = all(s["steps"] == steps for s in rep["segments"]) and after > 0
    restarted = [s["index"] for s in rep["segments"] if s["resumed_from"]]
    return {"passed": ok, "wall_s": wall, "steps_lost": lost,
            "detail": f"killed after {n} requests, {after} requests served after the restart, segments restarted: "
                      f"{restarted or 'none'}"}


def drill_driver(config: str, base: list[str], work: Path, steps: int, every: int, timeout: float) -> dict:
    """The driver os._exit(3)s once 3 checkpoints exist; the same command again resumes every segment."""
    out, marker = work / "driver", work / "driver.killed"
    r1, wall1 = _distill(config, out, [*base, "debug.kill_driver_after_checkpoints=3", f"debug.marker={marker}"],
                         timeout)
    if r1.returncode == 0 or not marker.exists():
        return {"passed": False, "wall_s": wall1, "detail": f"first run rc={r1.returncode} (expected a kill)"}
    time.sleep(3)  # let the dead driver's local Ray wind down
    newest = {}  # segment -> newest checkpointed step left by the killed run
    for m in (out / "ray").glob("seg-*/checkpoint_*/manifest.json"):
        k = json.loads(m.read_text())
        newest[k["segment"]] = max(newest.get(k["segment"], 0), k["step"])
    r2, wall2 = _distill(config, out, base, timeout)
    if r2.returncode != 0:
        return {"passed": False, "wall_s": wall1 + wall2, "detail": f"rerun rc={r2.returncode} {_tail(r2)}"}
    rep, _ = _read(out)
    resumed = {s["index"]: s["resumed_from"] for s in rep["segments"]}
    redone = sum(max(0, newest.get(k, 0) - resumed[k]) for k in resumed)
    ok = all(s["steps"] == steps for s in rep["segments"]) and any(resumed.values()) and redone == 0
    return {"passed": ok, "wall_s": wall1 + wall2, "steps_lost": redone,
            "detail": f"newest checkpoints {dict(sorted(newest.items()))}, resumed from {resumed} "
                      f"(+ < {every} uncheckpointed steps per segment)"}


DRILLS = {"worker": drill_worker, "teacher": drill_teacher, "driver": drill_driver}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="pipelines/*.yaml (default tiny.yaml, or digits.yaml with "
                                                  "--embedded)")
    p.add_argument("--embedded", action="store_true", help="the embedded digits teacher (pipelines/digits.yaml)")
    p.add_argument("--drills", default="worker,teacher,driver")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10, help="train.checkpoint_every")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temp folder)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per distill command")
    args = p.parse_args(argv)
    names = [d.strip() for d in args.drills.split(",") if d.strip()]
    unknown = [d for d in names if d not in DRILLS]
    if unknown:
        p.error(f"--drills: unknown {unknown}; choose from {', '.join(DRILLS)}")
    if args.steps < 2 * args.every:
        p.error("--steps must be at least 2 x --every (the worker drill kills between two checkpoints)")
    work = Path(args.work or tempfile.mkdtemp(prefix="o2mkd-drills-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = ["mlflow.enabled=false", "eval.enabled=false", f"train.steps={args.steps}",
            f"train.checkpoint_every={args.every}"]
    if args.embedded:
        config = args.config or str(ROOT / "pipelines" / "digits.yaml")
        base += ["train.batch_size=16", "train.val_batches=1"]
        label = "embedded digits teacher"
    else:
        config = args.config or str(ROOT / "pipelines" / "tiny.yaml")
        base.append(f"teacher.pretrained={tiny_teacher(work / 'tiny_teacher')}")
        label = "generated tiny teacher"
    base += args.overrides
    print(f"fault drills on {Path(config).name} ({label}), {args.steps} steps, checkpoint every {args.every}; "
          f"runs in {work}", flush=True)
    failed = 0
    for name in names:
        res = DRILLS[name](config, base, work, args.steps, args.every, args.timeout)
        failed += not res["passed"]
        lost = res.get("steps_lost")
        print(f"{name:8s} {'passed' if res['passed'] else 'FAILED'}  steps lost {'-' if lost is None else lost:>3}  "
              f"wall {res['wall_s']:6.1f} s  ({res['detail']})", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
