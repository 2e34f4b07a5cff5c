"""MACs ratio vs wall-time speedup of half-depth and half-width transformer students, measured side by side.

The teacher is a DiT-S/2-shaped ``DiTTransformer2DModel`` with random weights (12 blocks, hidden 384 = 6 heads of
64, patch 2, 4 latent channels, learned sigma: 8 output channels, 1000 classes; ``--sample-size 32`` latents are
256 px images). With ``--sd3``, also an MMDiT with SD3-medium's conditioning (16 latent channels, text width
4096, pooled text 2048, head size 64, ``--seq-len`` text tokens) scaled down to the same 12 blocks x 6 heads.
Students come from ``o2mkd_ray.core.transformer_students.build_transformer_student`` exactly as a distill run
builds them: half depth (``depth=0.5``: 6 of 12 blocks), half width (``width=0.5``: 3 heads, hidden 192) and both.

Per model: parameters and MACs per forward at batch 1 (``o2mkd_ray.core.costs.forward_cost``, the project's one
cost definition, the one UNets are counted with), the MACs ratio to the teacher, and the wall time of one forward
(``torch.inference_mode``) at each ``--batches`` size. Timing: one warm-up forward of every model, then ``--reps``
rounds, each running every model once in a rotated order (no model always first); medians, with the min-max
spread. speedup = teacher median / student median; efficiency = speedup / (1 / MACs ratio), the share of the
MACs cut that becomes wall time (1: all of it). ``efficiency (fastest)`` uses the fastest reps (load on a shared
machine only ever adds time); CPU times are in the JSON. ``--op-split B``: after the costs, a few profiled DiT
forwards per model at batch B, their ops' own CPU time grouped into matmul, attention, convolution and other ops
(what the MACs count and what they do not).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/transformer_speed.py --threads 1 --reps 7 --sd3 --op-split 8 \\
        --out docs/transformers.md --json benchmarks/results/transformer_speed.json
    .venv/bin/python benchmarks/transformer_speed.py --sample-size 8 --batches 1 --reps 1   # smoke
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

# (label, build_transformer_student keyword arguments)
STUDENTS = [
    ("half depth", {"depth": 0.5}),
    ("half width", {"width": 0.5}),
    ("half depth + half width", {"depth": 0.5, "width": 0.5}),
]


def dit_s_config(sample_size: int = 32, num_layers: int = 12, heads: int = 6) -> dict:
    """DiT-S/2's transformer config (facebook/DiT's S/2 model in diffusers' ``DiTTransformer2DModel`` terms)."""
    return {"num_attention_heads": heads, "attention_head_dim": 64, "in_channels": 4, "out_channels": 8,
            "num_layers": num_layers, "sample_size": sample_size, "patch_size": 2, "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate"}


def sd3_small_config(sample_size: int = 32, num_layers: int = 12, heads: int = 6) -> dict:
    """SD3-medium's ``SD3Transformer2DModel`` config with fewer, narrower blocks (SD3-medium: 24 blocks x 24
    heads of 64); the conditioning widths (text 4096, pooled 2048) and latent channels (16) are SD3's."""
    return {"sample_size": sample_size, "patch_size": 2, "in_channels": 16, "out_channels": 16,
            "num_layers": num_layers, "attention_head_dim": 64, "num_attention_heads": heads,
            "joint_attention_dim": 4096, "caption_projection_dim": heads * 64, "pooled_projection_dim": 2048,
            "pos_embed_max_size": max(96, sample_size // 2)}


def build_models(kind: str, cfg: dict, seed: int = 0) -> dict:
    """``{label: model}``: the teacher (random weights, seeded) and its students (:data:`STUDENTS`), in eval mode."""
    import torch
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel

    from o2mkd_ray.core.transformer_students import build_transformer_student

    torch.manual_seed(seed)
    cls = DiTTransformer2DModel if kind == "dit" else SD3Transformer2DModel
    teacher = cls(**cfg).eval()
    models = {"teacher": teacher}
    for label, kw in STUDENTS:
        models[label] = build_transformer_student(teacher, **kw)
    return models


def input_shape(model) -> tuple[int, int, int]:
    c = model.config
    return (int(c.in_channels), int(c.sample_size), int(c.sample_size))


def cost_rows(models: dict, seq_len: int = 77) -> dict:
    """``{label: {params, macs, macs_ratio, blocks, hidden}}`` via ``forward_cost`` (batch 1, one forward)."""
    from o2mkd_ray.core.costs import forward_cost

    out = {}
    for label, model in models.items():
        c = forward_cost(model, input_shape(model), seq_len=seq_len)
        out[label] = {**c, "blocks": int(model.config.num_layers),
                      "hidden": int(model.config.num_attention_heads) * int(model.config.attention_head_dim)}
    base = out["teacher"]["macs"]
    for row in out.values():
        row["macs_ratio"] = row["macs"] / base
    return out


def block_shares(cfg: dict, seq_len: int = 77) -> dict:
    """Where one DiT block's MACs go, from the architecture (per image): attention scores (QK^T and AV:
    2 N^2 d), attention projections (q, k, v, out: 4 N d^2), MLP (d -> 4d -> d: 8 N d^2) and the block's own
    adaLN-zero conditioning (timestep MLP 256 -> d -> d, modulation d -> 6d: 256 d + 7 d^2), N = image tokens.
    Halving d quarters every term but the scores, which halve."""
    n = (int(cfg["sample_size"]) // int(cfg["patch_size"])) ** 2
    d = int(cfg["num_attention_heads"]) * int(cfg["attention_head_dim"])
    return {"attention scores": 2 * n * n * d, "attention projections": 4 * n * d * d, "MLP": 8 * n * d * d,
            "adaLN": 256 * d + 7 * d * d}


def make_inputs(model, batch: int, seq_len: int, seed: int = 0) -> dict:
    """Random latents, timesteps and conditioning (class labels; or text and pooled text) for one forward."""
    import torch

    g = torch.Generator().manual_seed(seed)
    c = model.config
    kw = {"hidden_states": torch.randn(batch, *input_shape(model), generator=g),
          "timestep": torch.randint(0, 1000, (batch,), generator=g)}
    if c.get("joint_attention_dim") is not None:
        kw["encoder_hidden_states"] = torch.randn(batch, seq_len, int(c.joint_attention_dim), generator=g)
        kw["pooled_projections"] = torch.randn(batch, int(c.pooled_projection_dim), generator=g)
    else:
        kw["class_labels"] = torch.randint(0, int(c.num_embeds_ada_norm), (batch,), generator=g)
    return kw


def time_forwards(models: dict, batch: int, reps: int, seq_len: int = 77, log=print) -> dict:
    """``{label: {"wall": [s], "cpu": [s]}}``: one warm-up forward each, then ``reps`` rotated rounds."""
    import torch

    inputs = {label: make_inputs(m, batch, seq_len) for label, m in models.items()}
    names = list(models)
    times = {n: {"wall": [], "cpu": []} for n in names}
    with torch.inference_mode():
        for n in names:  # warm-up: allocator, kernel selection for this shape
            models[n](**inputs[n])
        for r in range(reps):
            for n in names[r % len(names):] + names[: r % len(names)]:
                w0, c0 = time.perf_counter(), time.process_time()
                models[n](**inputs[n])
                times[n]["wall"].append(time.perf_counter() - w0)
                times[n]["cpu"].append(time.process_time() - c0)
            log(f"  batch {batch} rep {r + 1}/{reps} (load {load()}): "
                + ", ".join(f"{n} {times[n]['wall'][-1] * 1e3:.0f} ms" for n in names))
    return times


OP_GROUPS = {"matmul": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::matmul"),
             "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                           "aten::_scaled_dot_product_attention_math"),
             "convolution": ("aten::mkldnn_convolution", "aten::_convolution", "aten::convolution")}


def op_split(models: dict, batch: int, seq_len: int = 77, reps: int = 3) -> dict:
    """``{label: {group: ms}}``: ``reps`` profiled forwards per model (after a warm-up, models interleaved), the
    median per group of its ops' own (self) CPU time
    grouped into matmul (linear layers), attention (the SDPA kernel), convolution (patch embedding) and other ops
    (norms, GELU, adds, adaLN modulation, copies and reshapes: their cost follows the activations, N x d)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    inputs = {label: make_inputs(m, batch, seq_len) for label, m in models.items()}
    samples: dict = {label: [] for label in models}
    with torch.inference_mode():
        for label, model in models.items():
            model(**inputs[label])
        for _ in range(reps):
            for label, model in models.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    model(**inputs[label])
                groups = dict.fromkeys([*OP_GROUPS, "other ops"], 0.0)
                for ev in prof.key_averages():
                    name = next((g for g, keys in OP_GROUPS.items() if ev.key in keys), "other ops")
                    groups[name] += ev.self_cpu_time_total / 1e3
                samples[label].append(groups)
    return {label: {g: statistics.median(s[g] for s in runs) for g in runs[0]} for label, runs in samples.items()}


def op_split_markdown(split: dict, costs: dict, batch: int) -> str:
    """The op split as a table, with the MACs each model does per ms of matmul + attention time."""
    head = ("| variant | " + " | ".join(f"{g} ms" for g in next(iter(split.values())))
            + " | GMACs / s in matmul + attention |\n" + "|---" * (len(next(iter(split.values()))) + 2) + "|\n")
    lines = [f"| {label} | " + " | ".join(f"{v:.1f}" for v in g.values())
             + f" | {costs[label]['macs'] * batch / 1e6 / max(g['matmul'] + g['attention'], 1e-9):.1f} |"
             for label, g in split.items()]
    return head + "\n".join(lines) + "\n"


def summarize(costs: dict, times: dict, batch: int, model_name: str) -> list[dict]:
    """One row per model at one batch size: medians, spread, speedup and efficiency."""
    med = statistics.median
    t_med, t_min = med(times["teacher"]["wall"]), min(times["teacher"]["wall"])
    rows = []
    for label, c in costs.items():
        wall = times[label]["wall"]
        speedup = t_med / med(wall)
        rows.append({"model": model_name, "variant": label, "batch": batch, "blocks": c["blocks"],
                     "hidden": c["hidden"], "params": c["params"], "macs": c["macs"],
                     "macs_ratio": c["macs_ratio"], "ms_median": med(wall) * 1e3, "ms_min": min(wall) * 1e3,
                     "ms_max": max(wall) * 1e3, "speedup": speedup,
                     "efficiency": speedup * c["macs_ratio"],
                     "efficiency_fastest": t_min / min(wall) * c["macs_ratio"],
                     "efficiency_cpu": med(times["teacher"]["cpu"]) / med(times[label]["cpu"]) * c["macs_ratio"]})
    return rows


def markdown(rows: list[dict]) -> str:
    """The table: one line per (model, batch, variant)."""
    head = ("| teacher | batch | variant | blocks x hidden | params | GMACs / image | MACs ratio | ms / forward "
            "(min-max) | speedup | efficiency | efficiency (fastest) |\n" + "|---" * 11 + "|\n")
    lines = [f"| {r['model']} | {r['batch']} | {r['variant']} | {r['blocks']} x {r['hidden']} | "
             f"{r['params'] / 1e6:.1f} M | {r['macs'] / 1e9:.3f} | {r['macs_ratio']:.3f} | "
             f"{r['ms_median']:.1f} ({r['ms_min']:.1f}-{r['ms_max']:.1f}) | {r['speedup']:.2f}x | "
             f"{r['efficiency']:.2f} | {r['efficiency_fastest']:.2f} |" for r in rows]
    return head + "\n".join(lines) + "\n"


def shares_markdown(cfg: dict, teacher_macs: int) -> str:
    """Where the teacher's MACs go: its blocks' share of the whole forward and, inside one block, the
    :func:`block_shares` (to one decimal: adaLN is small)."""
    s = block_shares(cfg)
    block = sum(s.values())
    tokens = (int(cfg["sample_size"]) // int(cfg["patch_size"])) ** 2
    return (f"DiT teacher ({tokens} tokens): its {cfg['num_layers']} blocks hold "
            f"{cfg['num_layers'] * block / teacher_macs:.1%} of its MACs per image; inside one block "
            "(architecture count): " + ", ".join(f"{k} {v / block:.1%}" for k, v in s.items()) + ".\n")


def load() -> str:
    """The 1, 5 and 15 minute load averages (the machine may be shared: read the figures against them)."""
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def write_section(path: Path, body: str, name: str = "transformer-speed") -> None:
    """``body`` as this benchmark's section of ``path`` (between its markers; the rest of the file is kept;
    appended when the file has no such section yet)."""
    from o2mkd_ray.core.atomic import write_text

    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    old = path.read_text() if path.exists() else ""
    section = f"{begin}\n{body}{end}"
    if begin in old and end in old:
        text = old[:old.index(begin)] + section + old[old.index(end) + len(end):]
    else:
        text = (old.rstrip() + "\n\n" if old.strip() else "") + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--sample-size", type=int, default=32, help="latent side (32: 256 px; default 32)")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated (default 1,8)")
    p.add_argument("--reps", type=int, default=7, help="timed rounds per batch size (default 7)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--sd3", action="store_true", help="also time the scaled-down SD3-medium-shaped MMDiT")
    p.add_argument("--seq-len", type=int, default=77, help="SD3 text tokens (default 77: CLIP only)")
    p.add_argument("--out", type=Path, default=None, help="write the table as a section of this markdown file")
    p.add_argument("--json", type=Path, default=None, help="write rows and raw times here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--op-split", type=int, default=0, metavar="BATCH",
                   help="also profile one DiT forward per model at this batch size (ops grouped)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    teachers = [("DiT-S/2", "dit", dit_s_config(args.sample_size))]
    if args.sd3:
        teachers.append(("SD3-medium-shaped, 12 x 384", "sd3", sd3_small_config(args.sample_size)))
    env = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
           f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"{env}; load average {load()}", flush=True)
    rows, raw, split_md, t0 = [], {}, "", time.perf_counter()
    for name, kind, cfg in teachers:
        models = build_models(kind, cfg, args.seed)
        costs = cost_rows(models, args.seq_len)
        if args.op_split and kind == "dit":
            split = op_split(models, args.op_split, args.seq_len)
            raw[f"{name}/op split, batch {args.op_split}"] = split
            split_md = (f"\n{name} at batch {args.op_split}, own CPU time of its ops (median of 3 profiled forwards "
                        "per model):"
                        f"\n\n{op_split_markdown(split, costs, args.op_split)}")
        for batch in batches:
            times = time_forwards(models, batch, args.reps, args.seq_len)
            raw[f"{name}/batch {batch}"] = times
            rows += summarize(costs, times, batch, name)
    table = markdown(rows)
    cmd = "python benchmarks/transformer_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
    body = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({env}; load average at the end "
            f"{load()}; {args.reps} reps, {time.perf_counter() - t0:.0f} s):\n\n    {cmd}\n\n{table}\n"
            + shares_markdown(teachers[0][2], rows[0]["macs"]) + split_md)
    print(body)
    result = {"command": cmd, "env": env, "reps": args.reps, "batches": batches, "rows": rows, "times_s": raw}
    if args.out:
        write_section(args.out, body)
        print(f"wrote {args.out}")
    if args.json:
        from o2mkd_ray.core.atomic import write_json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, result, default=float)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
