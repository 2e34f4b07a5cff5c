"""GPU check: the main job (3 segment TorchTrainers + the teacher service) at a size that means something on a GPU.

Teacher: the google/ddpm-cifar10-32 UNet2DModel shape (35.7 M parameters; random weights, written to
``OUT/teacher`` with save_pretrained: only the costs matter), students of width 0.5, 32x32x3 inputs (the digits
data upsampled and repeated to 3 channels: nothing is downloaded). Variants, each one whole ``run_distillation``:

  shared_actor   3 segments sharing one GPU (``ray.gpus_per_worker`` 0.25) and one teacher actor on the same GPU
                 (``teacher.num_gpus`` 0.25) computing in ``teacher.dtype: bfloat16``
  shared_local   the same, with a bf16 teacher copy inside each worker (``teacher.mode: local``)
  ddp            with two or more GPUs: ``use_gpu`` DDP inside a segment, 2 workers x 1 whole GPU per segment,
                 ``min(3, GPUs // 2)`` segments, teacher local (skipped with one GPU)

Printed and written to ``--out``/gpu_check.json: samples/s per segment (rank 0's, all ranks counted), the teacher's
utilisation (actor busy time over the window in which the segments' loops trained; ``n/a`` for local teachers), the peak GPU memory of every
process (``torch.cuda.max_memory_allocated`` reported by each training rank in its metrics, and the peak
``nvidia-smi`` used memory per PID sampled every 0.5 s, which also covers the teacher actor), and the
actor-vs-local ratio of the summed samples/s.

Without a CUDA GPU it prints one line saying so and exits 0. ``--dry-run`` builds every variant's config for
``--gpus`` GPUs (default 2, so the DDP variant is built too), runs the engine's pre-flight on it (teacher files,
segments, students' shapes) and checks that each variant's GPU requests fit: no GPU needed.

    python benchmarks/gpu_check.py --out "$OUT"                  # on a GPU machine, < 8 min on an H200
    python benchmarks/gpu_check.py --dry-run --out /tmp/gpu_check  # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

NO_GPU_LINE = "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing to measure"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check"),
                   help="folder for gpu_check.json, the teacher and the runs (default $OUT, else ./gpu_check)")
    p.add_argument("--steps", type=int, default=300, help="training steps per segment (default 300)")
    p.add_argument("--batch", type=int, default=128, help="train.batch_size per segment (default 128)")
    p.add_argument("--time-limit", type=float, default=420.0,
                   help="seconds for the whole check: a variant is skipped when less than --variant-s is left")
    p.add_argument("--variant-s", type=float, default=100.0, help="the time one variant is allowed (default 100)")
    p.add_argument("--variants", default="shared_actor,shared_local,ddp", help="which variants, in this order")
    p.add_argument("--dry-run", action="store_true", help="build and pre-flight every variant's config; no GPU")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: the visible ones; 2 dry)")
    return p.parse_args(argv)


def make_teacher(folder: Path) -> Path:
    """A random-weight google/ddpm-cifar10-32-shaped teacher saved as a diffusers pipeline folder (reused)."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from sampling_builds import CIFAR10_DDPM_SCHEDULER, CIFAR10_DDPM_UNET
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR10_DDPM_UNET)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**CIFAR10_DDPM_SCHEDULER)).save_pretrained(folder)
    return folder


def variant_overrides(name: str, teacher: Path, steps: int, batch: int, gpus: int) -> list[str] | None:
    """The ``--set`` overrides of ``pipelines/digits.yaml`` for one variant (None: not runnable on ``gpus``)."""
    common = [f"teacher.pretrained={teacher}", "teacher.dtype=bfloat16",
              "data.resolution=32", "data.channels=3", "students.width=0.5", f"train.steps={steps}",
              f"train.batch_size={batch}", f"train.checkpoint_every={max(1, steps // 3)}", "train.val_batches=1",
              "train.log_every=0", "mlflow.enabled=false", "eval.enabled=false", "sampling.steps=10",
              "sampling.num_images=4", "ray.cpus_per_worker=1", "teacher.num_cpus=1"]
    if name == "shared_actor":
        return [*common, "segments.n=3", "teacher.mode=actor", "teacher.num_gpus=0.25", "ray.gpus_per_worker=0.25"]
    if name == "shared_local":
        return [*common, "segments.n=3", "teacher.mode=local", "ray.gpus_per_worker=0.25"]
    if name == "ddp":
        if gpus < 2:
            return None
        return [*common, f"segments.n={min(3, gpus // 2)}", "teacher.mode=local", "ray.workers_per_segment=2",
                "ray.gpus_per_worker=1"]
    raise SystemExit(f"--variants: unknown {name!r}; use shared_actor, shared_local, ddp")


def gpu_demand(cfg) -> float:
    """GPUs the variant asks Ray for: every segment's workers plus the teacher actors."""
    r, t = cfg.ray, cfg.teacher
    per_seg = r.workers_per_segment * r.gpus_per_worker
    teacher = t.replicas * t.num_gpus if t.mode == "actor" else 0.0
    return cfg.segments.n * per_seg + teacher


def build_config(name: str, args, teacher: Path, gpus: int):
    from o2mkd_ray.config.loading import load_config

    sets = variant_overrides(name, teacher, args.steps, args.batch, gpus)
    return None if sets is None else load_config(ROOT / "pipelines" / "digits.yaml", sets)


def dry_run(args) -> dict:
    """Every variant's config built and pre-flighted for ``--gpus`` GPUs; raises on a config that cannot run."""
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.engine.driver import describe_plan
    from o2mkd_ray.engine.session import preflight
    from o2mkd_ray.engine.storage import run_storage

    gpus = 2 if args.gpus is None else args.gpus
    teacher = make_teacher(args.out / "teacher")
    result = {"dry_run": True, "gpus": gpus, "variants": {}}
    for name in args.variants.split(","):
        cfg = build_config(name, args, teacher, gpus)
        if cfg is None:
            result["variants"][name] = {"skipped": f"needs 2 or more GPUs, planned for {gpus}"}
            print(f"{name}: skipped (needs 2 or more GPUs)")
            continue
        out = preflight(cfg, args.out / "runs" / name)
        demand = gpu_demand(cfg)
        if demand > gpus + 1e-9:
            raise SystemExit(f"{name}: asks for {demand:g} GPUs, only {gpus} planned")
        seg = Segments.uniform(1000, cfg.segments.n)
        print(f"{name}: {demand:g} of {gpus} GPU(s) requested\n"
              + describe_plan(cfg, seg, list(range(seg.n)), ["teacher"] if cfg.teacher.mode == "actor" else [],
                              run_storage(cfg, out)))
        result["variants"][name] = {"gpu_demand": demand, "segments": cfg.segments.n,
                                    "teacher_mode": cfg.teacher.mode, "teacher_dtype": cfg.teacher.dtype,
                                    "workers_per_segment": cfg.ray.workers_per_segment,
                                    "gpus_per_worker": cfg.ray.gpus_per_worker}
    return result


class GpuSampler:
    """Peak ``nvidia-smi`` used memory (MiB) per PID, sampled every ``every_s`` in a thread, with each PID's
    command line (Ray names its processes: ``ray::TeacherActor``, ``ray::RayTrainWorker``, ...)."""

    def __init__(self, every_s: float = 0.5):
        self.every_s, self.peak, self.role = every_s, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rows = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                       "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                      timeout=10, check=False).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for row in rows.strip().splitlines():
                try:
                    pid, mb = (int(v.strip()) for v in row.split(","))
                except ValueError:
                    continue
                self.peak[pid] = max(self.peak.get(pid, 0), mb)
                if pid not in self.role:
                    self.role[pid] = _cmdline(pid)
            self._stop.wait(self.every_s)

    def processes(self) -> list[dict]:
        return [{"pid": p, "role": self.role.get(p, "?"), "peak_used_mb": mb} for p, mb in sorted(self.peak.items())]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:80].strip()
    except OSError:
        return "?"


def run_variant(name: str, cfg, out: Path) -> dict:
    """One whole run_distillation; its figures from report.json, history.json and the rank ledgers."""
    from o2mkd_ray.engine.driver import run_distillation

    t0 = time.time()
    with GpuSampler() as sampler:
        report = run_distillation(cfg, out, progress=False, verbose=False)
    wall = time.time() - t0
    hist = json.loads((out / "history.json").read_text())
    # the teacher's busy time over the window in which the segments' loops actually trained (from the first
    # loop's start to the last one's end), not over fit(), which includes starting the worker groups
    window = max(s["finished_at"] for s in report["segments"]) - min(s["started_at"] for s in report["segments"])
    teacher = report["teacher"]
    segs = []
    for s in report["segments"]:
        k = s["index"]
        ranks = {}
        for f in sorted((out / "ray" / f"seg-{k:02d}").glob("rank-*.json")):
            led = json.loads(f.read_text())
            peaks = [r["gpu_peak_mb"] for r in led["reports"] if r.get("gpu_peak_mb") is not None]
            ranks[led["rank"]] = max(peaks) if peaks else None
        last = (hist.get(str(k)) or [{}])[-1]
        segs.append({"index": k, "samples_per_s": s.get("samples_per_s"), "steps": s.get("steps"),
                     "gpu_peak_mb_rank0": last.get("gpu_peak_mb"), "gpu_peak_mb_by_rank": ranks})
    util = teacher.get("busy_s", 0.0) / max(window, 1e-9) if teacher.get("mode") == "actor" else None
    return {"wall_s": round(wall, 1), "train_window_s": round(window, 1), "phases": report.get("phases"),
            "segments": segs,
            "samples_per_s_total": sum(s["samples_per_s"] or 0 for s in segs),
            "teacher": {"mode": teacher.get("mode"), "dtype": cfg.teacher.dtype, "busy_s": teacher.get("busy_s"),
                        "utilisation": util, "mean_batch": teacher.get("mean_batch")},
            "processes": sampler.processes()}


def print_variant(name: str, r: dict) -> None:
    t = r["teacher"]
    util = "n/a (a copy in each worker)" if t["utilisation"] is None else f"{100 * t['utilisation']:.0f} %"
    print(f"{name}: wall {r['wall_s']:.0f} s, teacher {t['mode']} {t['dtype']}, utilisation {util}, "
          f"total {r['samples_per_s_total']:.0f} samples/s")
    for s in r["segments"]:
        print(f"  seg-{s['index']:02d}  {s['samples_per_s'] or 0:8.0f} samples/s  peak allocated by rank (MiB) "
              f"{ {k: round(v or 0) for k, v in s['gpu_peak_mb_by_rank'].items()} or s['gpu_peak_mb_rank0']}")
    for p in r["processes"]:
        print(f"  pid {p['pid']:>7}  {p['peak_used_mb']:6d} MiB used (nvidia-smi)  {p['role']}")


def gpu_run(args) -> dict:
    import torch

    gpus = args.gpus or torch.cuda.device_count()
    result = {"gpu": torch.cuda.get_device_name(0), "gpus": gpus, "torch": torch.__version__, "variants": {}}
    teacher = make_teacher(args.out / "teacher")
    t_start = time.time()
    for name in args.variants.split(","):
        cfg = build_config(name, args, teacher, gpus)
        left = args.time_limit - (time.time() - t_start)
        if cfg is None or left < args.variant_s:
            why = "needs 2 or more GPUs" if cfg is None else f"time limit ({left:.0f} s left)"
            result["variants"][name] = {"skipped": why}
            print(f"{name}: skipped ({why})", flush=True)
            continue
        try:
            result["variants"][name] = r = run_variant(name, cfg, args.out / "runs" / name)
            print_variant(name, r)
        except Exception as e:  # noqa: BLE001 - one failed variant must not lose the others' figures
            result["variants"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
        _write(args.out, result)  # after every variant: a cut-off run still leaves its figures
    a, b = (result["variants"].get(v, {}).get("samples_per_s_total") for v in ("shared_actor", "shared_local"))
    if a and b:
        result["actor_vs_local"] = a / b
        print(f"actor vs local teacher: {a:.0f} vs {b:.0f} samples/s (ratio {a / b:.2f})")
    return result


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out = args.out.expanduser().resolve()
    if args.dry_run:
        _write(args.out, dry_run(args))
        print(f"dry run: every variant's config is valid; wrote {args.out / 'gpu_check.json'}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print(NO_GPU_LINE)
        _write(args.out, {"gpu": None, "note": NO_GPU_LINE})
        return 0
    result = gpu_run(args)
    _write(args.out, result)
    print(f"wrote {args.out / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
