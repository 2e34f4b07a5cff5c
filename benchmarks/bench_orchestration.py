"""Orchestration cost: the same O2MKD distillation as a plain in-process loop and through the Ray engine.

What it measures: one config (default ``pipelines/digits.yaml``: the embedded digits teacher, N=3 students of
width 0.5; ``--steps`` steps per segment) run twice in this process,

  local  ``o2mkd_ray.engine.session.run_local``: no Ray, the segments one after another, the teacher in-process,
         torch using ``--threads`` threads (default: all cores)
  ray    ``o2mkd_ray.engine.driver.run_distillation``: an embedded local Ray, the teacher as a shared actor, one
         TorchTrainer per segment, all in flight at once; Ray's processes take OMP_NUM_THREADS from their CPU
         share (this script unsets the variable while Ray starts)

and prints, for each, the throughput of pure training in student samples/s (ray: the sum of ``report.json``
segments[*].samples_per_s, the segments running concurrently; local: total samples / total training time), a
"window" throughput that does not assume the segments overlapped (total samples / first training start to last
training end), a "span" one (the same from the first segment's start, its set-up included), the end-to-end
wall time including Ray start-up, teacher service and shutdown, and the ratios ray / local.

Target: ray / local pure-training throughput >= 0.8 on 2 cores (the Ray engine costs at most 20 % on one node;
it pays off with more nodes, GPUs, or workers per segment).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_orchestration.py            # 200 steps per segment
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_orchestration.py --steps 20     # smoke test, ~2 min
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_orchestration.py --set train.batch_size=32 \\
        --json bench_orchestration.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Ray processes must size their thread pools from their CPU share, not inherit the caller's OMP_NUM_THREADS
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("config", nargs="?", default=str(ROOT / "pipelines" / "digits.yaml"),
                   help="experiment YAML (default pipelines/digits.yaml)")
    p.add_argument("--steps", type=int, default=200, help="training steps per segment (default 200)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, repeatable (applied after --steps)")
    p.add_argument("--out", type=Path, default=None,
                   help="run folder (default: a new temp dir); must be new or empty")
    p.add_argument("--engines", default="local,ray", help="which engines, in this order (default local,ray)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads of this process (the local engine; default: all cores)")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def summarize(report: dict, wall_s: float, batch: int) -> dict:
    """Throughput figures of one run from its report.json dict (``batch``: train.batch_size of a segment)."""
    segs = report["segments"]
    samples = [int(s["steps"]) * batch for s in segs]
    sps = [float(s["samples_per_s"]) for s in segs]
    train_s = [n / r for n, r in zip(samples, sps)]  # pure training time of each segment
    ends = [float(s["finished_at"]) for s in segs]
    span = max(ends) - min(float(s["started_at"]) for s in segs)
    # training window: each segment's training taken to end at its finish, so it began train_s earlier; with
    # staggered segments the summed rates overstate what ran at once, this does not
    window = max(ends) - min(e - t for e, t in zip(ends, train_s))
    if report["engine"] == "ray":
        train_sps = sum(sps)  # segments run concurrently: their rates add up
    else:
        train_sps = sum(samples) / sum(train_s)  # one after another: total samples / total training time
    teacher = report.get("teacher", {})
    return {
        "engine": report["engine"], "segments": len(segs), "total_samples": sum(samples),
        "train_samples_per_s": train_sps, "window_samples_per_s": sum(samples) / window, "window_s": window,
        "span_samples_per_s": sum(samples) / span, "span_s": span,
        "segment_samples_per_s": sps, "segment_train_s": train_s, "wall_s": wall_s,
        "teacher_requests": teacher.get("requests"), "teacher_mean_batch": teacher.get("mean_batch"),
        "teacher_busy_s": teacher.get("busy_s"), "phases": report.get("phases", {}),
        "final_loss": [s.get("final_loss") for s in segs],
    }


def run_engine(engine: str, cfg, out: Path, threads: int) -> dict:
    import torch

    from o2mkd_ray.engine.driver import run_distillation
    from o2mkd_ray.engine.session import run_local

    saved = {v: os.environ.get(v) for v in _THREAD_VARS}
    t0 = time.perf_counter()
    try:
        if engine == "local":
            torch.set_num_threads(threads)
            report = run_local(cfg, out, progress=False)
        elif engine == "ray":
            for v in _THREAD_VARS:
                os.environ.pop(v, None)
            report = run_distillation(cfg, out, progress=False)
        else:
            sys.exit(f"--engines: unknown engine {engine!r}; use local and/or ray")
    finally:
        for v, val in saved.items():
            if val is not None:
                os.environ[v] = val
    return summarize(report, time.perf_counter() - t0, cfg.train.batch_size)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import pandas as pd
    import torch

    from o2mkd_ray.config.loading import load_config

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    print(f"torch threads (this process, local engine): {torch.get_num_threads()} (--threads {args.threads}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {os.cpu_count()} cores)")
    overrides = [f"train.steps={args.steps}", "mlflow.enabled=false", "eval.enabled=false", *args.overrides]
    cfg = load_config(args.config, overrides)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    out = args.out or Path(tempfile.mkdtemp(prefix="o2mkd-bench-orch-"))
    for e in engines:
        d = out / e
        if d.exists() and any(d.iterdir()):
            sys.exit(f"--out: {d} is not empty (a finished run there would be resumed, not timed); "
                     "use a new --out")
    print(f"config {args.config}: N={cfg.segments.n}, width {cfg.students.width}, {cfg.train.steps} steps x "
          f"batch {cfg.train.batch_size} per segment, teacher mode {cfg.teacher.mode} "
          f"({cfg.teacher.num_cpus} CPU), {cfg.ray.workers_per_segment} worker(s) x "
          f"{cfg.ray.cpus_per_worker} CPU per segment; out {out}")

    results = {}
    for e in engines:
        print(f"--- {e} ...", flush=True)
        results[e] = run_engine(e, cfg, out / e, args.threads)
        r = results[e]
        print(f"--- {e}: {r['train_samples_per_s']:.1f} samples/s training, wall {r['wall_s']:.1f} s",
              flush=True)

    cols = ["total_samples", "train_samples_per_s", "window_samples_per_s", "span_samples_per_s", "span_s",
            "wall_s", "teacher_requests", "teacher_mean_batch"]
    table = pd.DataFrame([{"engine": e, **{c: results[e][c] for c in cols}} for e in engines])
    table = table.set_index("engine")
    with pd.option_context("display.width", 160, "display.max_columns", 20,
                           "display.float_format", "{:.2f}".format):
        print(table)
    for e in engines:
        r = results[e]
        print(f"{e}: per-segment samples/s {[round(x, 1) for x in r['segment_samples_per_s']]}"
              + (f", phases {({k: round(v, 1) for k, v in r['phases'].items()})}" if r["phases"] else ""))

    summary = {"config": args.config, "overrides": overrides, "steps": cfg.train.steps,
               "batch_size": cfg.train.batch_size, "threads": args.threads, "cores": os.cpu_count(),
               "out": str(out), "engines": results}
    if {"local", "ray"} <= set(results):
        loc, ray_ = results["local"], results["ray"]
        summary["ratio_train_throughput"] = ray_["train_samples_per_s"] / loc["train_samples_per_s"]
        summary["ratio_window_throughput"] = ray_["window_samples_per_s"] / loc["window_samples_per_s"]
        summary["ratio_span_throughput"] = ray_["span_samples_per_s"] / loc["span_samples_per_s"]
        summary["ratio_end_to_end"] = loc["wall_s"] / ray_["wall_s"]
        summary["target"] = 0.8
        summary["meets_target"] = bool(summary["ratio_train_throughput"] >= 0.8)
        print(f"ray/local training throughput: {summary['ratio_train_throughput']:.3f}  (target >= 0.8: "
              f"{'MET' if summary['meets_target'] else 'NOT MET'})")
        print(f"ray/local window throughput (total samples / first training start to last training end): "
              f"{summary['ratio_window_throughput']:.3f}")
        print(f"ray/local span throughput (first segment start, set-up included, to last segment end): "
              f"{summary['ratio_span_throughput']:.3f}")
        print(f"ray/local end-to-end speed (local wall / ray wall, Ray start-up included): "
              f"{summary['ratio_end_to_end']:.3f}  ({loc['wall_s']:.1f} s vs {ray_['wall_s']:.1f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.json}")
    return summary


if __name__ == "__main__":
    main()
