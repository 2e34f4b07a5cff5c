"""Orchestration cost: the same O2MKD distillation through the local loop and through the Ray engine, and the cost
of the live-metrics stream.

Headline: the END-TO-END wall time of the same work (default ``pipelines/digits.yaml``: the embedded digits teacher,
N=3 students of width 0.5, ``--steps`` steps per segment, no evaluation, no MLflow), local engine vs Ray engine,
``--reps`` interleaved repetitions (local, ray, then ray, local, ...) in one run, medians. Ray's own time is
reported per phase (``report.json["phases"]``: load, Ray start, teacher service, training, shutdown).
Secondary figures: the per-segment training rates (samples/s) and their sum, which assumes the segments overlapped
perfectly and leaves out the report/checkpoint barrier: it is not the headline.

``--log-every N`` adds the live-metrics comparison: the local engine with ``train.log_every=N`` (MLflow on an
embedded SQLite store, so every interval is delivered) against ``train.log_every=0``, interleaved, medians of the
training throughput: the cost of the stream inside the training loop.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_orchestration.py --steps 200 --reps 2
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_orchestration.py --steps 20 --reps 1    # smoke test
    .venv/bin/python benchmarks/bench_orchestration.py --engines local --log-every 10 --steps 200 --reps 3
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
    p.add_argument("--reps", type=int, default=2, help="interleaved repetitions per engine (default 2)")
    p.add_argument("--log-every", type=int, default=None,
                   help="also measure the live-metrics stream: local engine with train.log_every=N vs 0")
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
        # fit() to the training loop's start, the slowest segment's: the worker groups start side by side
        "worker_startup_s": max((report.get("worker_startup_s") or {}).values(), default=None),
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
    import torch

    from o2mkd_ray.config.loading import load_config

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    overrides = [f"train.steps={args.steps}", "mlflow.enabled=false", "eval.enabled=false", *args.overrides]
    cfg = load_config(args.config, overrides)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    out = args.out or Path(tempfile.mkdtemp(prefix="o2mkd-bench-orch-"))
    print(f"config {args.config}: N={cfg.segments.n}, width {cfg.students.width}, {cfg.train.steps} steps x batch "
          f"{cfg.train.batch_size} per segment; torch threads {torch.get_num_threads()}; {os.cpu_count()} cores; "
          f"{args.reps} interleaved repetition(s); out {out}", flush=True)
    summary = {"config": args.config, "overrides": overrides, "steps": cfg.train.steps, "reps": args.reps,
               "cores": os.cpu_count(), "out": str(out)}
    if len(engines) > 1 or args.log_every is None:
        summary["engines"] = compare_engines(cfg, engines, out, args)
    if args.log_every is not None:
        summary["logging"] = compare_logging(args, out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str))
        print(f"wrote {args.json}")
    return summary


def _median(xs):
    import statistics

    return statistics.median(xs)


def compare_engines(cfg, engines: list[str], out: Path, args) -> dict:
    """Interleaved repetitions of each engine on the same work; medians of wall time and per-phase times."""
    runs: dict[str, list[dict]] = {e: [] for e in engines}
    for rep in range(args.reps):
        order = engines if rep % 2 == 0 else list(reversed(engines))
        for e in order:
            r = run_engine(e, cfg, out / f"{e}-{rep}", args.threads)
            runs[e].append(r)
            print(f"  rep {rep} {e:5s}: wall {r['wall_s']:7.1f} s   segments' summed rate "
                  f"{r['train_samples_per_s']:.0f} samples/s", flush=True)
    res = {e: {"wall_s": [r["wall_s"] for r in rs], "median_wall_s": _median([r["wall_s"] for r in rs]),
               "median_train_samples_per_s": _median([r["train_samples_per_s"] for r in rs]),
               "segment_samples_per_s": [r["segment_samples_per_s"] for r in rs],
               "median_phases": {k: _median([r["phases"][k] for r in rs]) for k in (rs[0]["phases"] or {})},
               "median_worker_startup_s": _median([r["worker_startup_s"] for r in rs])
               if all(r.get("worker_startup_s") is not None for r in rs) else None}
           for e, rs in runs.items()}
    for e, r in res.items():
        phases = "  ".join(f"{k} {v:.1f}" for k, v in r["median_phases"].items())
        startup = r["median_worker_startup_s"]
        print(f"{e:5s}: median end-to-end wall {r['median_wall_s']:.1f} s over {args.reps} rep(s)"
              + (f"; phases (s): {phases}" if phases else "")
              + (f"; worker groups' start-up inside train_s (slowest segment) {startup:.1f}" if startup else ""))
    if {"local", "ray"} <= set(res):
        ratio = res["ray"]["median_wall_s"] / res["local"]["median_wall_s"]
        res["ratio_ray_over_local_wall"] = ratio
        print(f"HEADLINE ray/local end-to-end wall time (medians, same work): {ratio:.3f}")
        print(f"secondary: summed per-segment rates ray/local "
              f"{res['ray']['median_train_samples_per_s'] / res['local']['median_train_samples_per_s']:.3f} "
              "(assumes perfect overlap, leaves out the report barrier)")
    return res


def compare_logging(args, out: Path) -> dict:
    """The local engine with ``train.log_every=args.log_every`` vs 0, MLflow on (SQLite), interleaved; medians of
    the training throughput (samples per second of training time, the stream's delivery included)."""
    from o2mkd_ray.config.loading import load_config

    rates: dict[int, list[float]] = {args.log_every: [], 0: []}
    for rep in range(args.reps):
        for every in ((args.log_every, 0) if rep % 2 == 0 else (0, args.log_every)):
            d = out / f"log{every}-{rep}"
            cfg = load_config(args.config, [f"train.steps={args.steps}", "eval.enabled=false",
                                            f"train.log_every={every}",
                                            f"mlflow.tracking_uri=sqlite:///{d.parent / 'bench-mlflow.db'}",
                                            *args.overrides])
            r = run_engine("local", cfg, d, args.threads)
            rates[every].append(r["train_samples_per_s"])
            print(f"  rep {rep} log_every={every:<3d}: {r['train_samples_per_s']:.1f} samples/s", flush=True)
    on, off = _median(rates[args.log_every]), _median(rates[0])
    print(f"live metrics every {args.log_every} steps: median {on:.1f} vs {off:.1f} samples/s without "
          f"(cost {100 * (1 - on / off):+.2f} %)")
    return {"log_every": args.log_every, "samples_per_s": {str(k): v for k, v in rates.items()},
            "median_on": on, "median_off": off, "cost_fraction": 1 - on / off}


if __name__ == "__main__":
    main()
