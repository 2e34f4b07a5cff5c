"""Where sampling time goes (``bench_sampling.py --profile``): one profiled run per pipeline, ops grouped.

Per pipeline and batch size, from one ``torch.profiler`` run (self CPU time of every op):

  conv          convolutions (mkldnn, the slow im2col path, inductor's mkldnn conv kernels)
  matmul        mm / addmm / bmm / linear / scaled-dot-product attention
  copies        copy_, clone, contiguous, layout changes (e.g. a weight re-laid out for every call)
  other ops     norms, activations, adds, concatenations, upsampling: memory-bound ops whose cost scales with
                the activations (x width), not with the MACs (x width^2)
  compiled      time inside torch.compile'd regions not attributed to a listed op (fused inductor kernels)
  python        wall time outside every op: the pipeline loop, the scheduler's Python, module call overhead

and, from a second run without the profiler, with forward hooks (uncompiled modes only: hooks inside a compiled
region would break its graph): ``step_overhead`` (wall time outside the MultiStudentUNet / UNet calls: scheduler,
noise, decode) and ``routing`` (MultiStudentUNet time outside its students: choosing the owner, slicing).
``conv_gmacs_s``: convolution MACs of the run over the time in conv ops (the convs' throughput).
"""

from __future__ import annotations

import time
from collections import defaultdict

CATEGORIES = ("conv", "matmul", "copies", "other ops", "compiled", "python")


def _category(name: str) -> str:
    n = name.lower()
    if "conv" in n:
        return "conv"
    if any(k in n for k in ("::mm", "addmm", "bmm", "matmul", "linear", "attention")):
        return "matmul"
    if any(k in n for k in ("copy_", "clone", "contiguous", "_to_copy")):
        return "copies"
    if "compiled" in n or "cpp_fused" in n or "graph_" in n:
        return "compiled"
    return "other ops"


def conv_macs(unet, sample_shape, **kwargs) -> int:
    """MACs of the convolutions alone in one forward (``torch.utils.flop_counter``, per-op counts)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(sample_shape)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        unet(x, torch.tensor([500]), **kwargs)
    counts = fc.get_flop_counts().get("Global", {})
    return sum(v for op, v in counts.items() if "convolution" in str(op)) // 2


def profile_run(pipe, run, batch: int, steps: int, seed: int) -> dict:
    """Seconds per category (see the module docstring) of one sampling run, and its top ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (wall, _), _ = run(pipe, batch, steps, seed)
    sums: dict = defaultdict(float)
    ops: dict = defaultdict(float)
    for e in prof.key_averages():
        sec = e.self_cpu_time_total / 1e6
        sums[_category(e.key)] += sec
        ops[e.key] += sec
    traced = sum(sums.values())
    sums["python"] = max(wall - traced, 0.0)
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:5]
    return {"wall_s": wall, **{c: sums.get(c, 0.0) for c in CATEGORIES},
            "top": [(k, v) for k, v in top]}


def hook_overheads(pipe, unet, run, batch: int, steps: int, seed: int) -> dict:
    """``step_overhead`` and ``routing`` seconds of one run (forward hooks on ``unet`` and its students)."""
    inner = [unet.student(k) for k in range(unet.num_students)] if hasattr(unet, "student") else []
    clock = {"unet": 0.0, "students": 0.0}
    starts: dict = {}

    def pre(key):
        def hook(module, args, kwargs=None):
            starts[key] = time.perf_counter()
        return hook

    def post(key):
        def hook(module, args, out):
            clock[key] += time.perf_counter() - starts[key]
        return hook

    handles = [unet.register_forward_pre_hook(pre("unet")), unet.register_forward_hook(post("unet"))]
    for s in inner:
        handles += [s.register_forward_pre_hook(pre("students")), s.register_forward_hook(post("students"))]
    try:
        (wall, _), _ = run(pipe, batch, steps, seed)
    finally:
        for h in handles:
            h.remove()
    return {"step_overhead": wall - clock["unet"], "routing": clock["unet"] - clock["students"] if inner else 0.0}


def scaling_bound(teacher: dict, macs_speedup: float, act_speedup: float) -> float:
    """The efficiency the teacher's own profile predicts (a model, not a hard bound): students whose MAC ops
    (conv, matmul) are faster by the MACs speedup, whose other ops and copies (memory-bound, proportional to the
    activations) are faster by ``act_speedup`` (1 / width) and whose Python time is the same. Weight copies
    shrink with the weights (width^2), so where copies are large the model is pessimistic."""
    w = teacher["wall_s"]
    mac, act = teacher["conv"] + teacher["matmul"], teacher["copies"] + teacher["other ops"] + teacher["compiled"]
    students = mac / macs_speedup + act / act_speedup + teacher["python"]
    return w / students / macs_speedup


def ceiling(teacher: dict, macs_speedup: float, act_speedup: float) -> float:
    """The efficiency students cannot exceed while their activation-bound ops shrink only with the activations:
    :func:`scaling_bound` with the students' Python time removed altogether (MAC ops faster by the MACs
    speedup, copies / other ops / compiled kernels by ``act_speedup``, Python free). With a share ``a`` of the
    teacher's time in activation-bound ops, at most ``1 / (1 - a + a * macs_speedup / act_speedup)``."""
    mac, act = teacher["conv"] + teacher["matmul"], teacher["copies"] + teacher["other ops"] + teacher["compiled"]
    return (mac + act) / (mac + act * macs_speedup / act_speedup)


def bounds_table(rows: list[dict], macs_speedup: float, act_speedup: float) -> list[str]:
    """Per batch size and mode: the profiled runs' efficiency next to :func:`scaling_bound`'s model and the
    :func:`ceiling` the teacher's share of activation-bound ops leaves."""
    by = {(r["batch"], r["network"], r["mode"]): r for r in rows}
    lines = ["", (f"Efficiency the teacher's profile predicts (MAC ops / {macs_speedup:.2f}, other ops, copies and "
             f"compiled kernels / {act_speedup:.2f}, Python time unchanged: model; Python free: ceiling) against "
             "the profiled runs' own:"), "",
             "| batch | mode | teacher MAC-op share | activation-bound share | model | ceiling | profiled run |",
             "|---|---|---|---|---|---|---|"]
    for (batch, network, mode), t in by.items():
        s = by.get((batch, "students", mode))
        if network != "teacher" or s is None:
            continue
        share = (t["conv"] + t["matmul"]) / t["wall_s"]
        act = (t["copies"] + t["other ops"] + t["compiled"]) / t["wall_s"]
        lines.append(f"| {batch} | {mode} | {100 * share:.0f}% | {100 * act:.0f}% | "
                     f"{scaling_bound(t, macs_speedup, act_speedup):.2f} | {ceiling(t, macs_speedup, act_speedup):.2f}"
                     f" | {t['wall_s'] / s['wall_s'] / macs_speedup:.2f} |")
    return lines


def markdown(rows: list[dict], header: str, macs_speedup: float, act_speedup: float) -> str:
    """The profile table (shares of wall time per category), the scaling bound and the top ops."""
    lines = [header, "",
             "| batch | pipeline | mode | wall s | " + " | ".join(CATEGORIES) + " | step overhead | routing |"
             " conv GMAC/s |",
             "|---" * (7 + len(CATEGORIES)) + "|"]
    for r in rows:
        share = " | ".join(f"{100 * r[c] / r['wall_s']:.0f}%" for c in CATEGORIES)
        extra = (f"{100 * r['step_overhead'] / r['wall_s']:.1f}% | {100 * r['routing'] / r['wall_s']:.2f}%"
                 if "routing" in r else "– | –")
        lines.append(f"| {r['batch']} | {r['network']} | {r['mode']} | {r['wall_s']:.3f} | {share} | {extra} | "
                     f"{r['conv_gmacs_s']:.1f} |")
    lines += bounds_table(rows, macs_speedup, act_speedup)
    lines += ["", "Top ops by self CPU time (seconds of the profiled run):", ""]
    for r in rows:
        tops = ", ".join(f"`{k}` {v:.3f}" for k, v in r["top"])
        lines.append(f"- batch {r['batch']} {r['network']}/{r['mode']}: {tops}")
    return "\n".join(lines) + "\n"
