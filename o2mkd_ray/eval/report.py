"""The reports of :func:`o2mkd_ray.eval.evaluate.evaluate_run`: plots (``agreement_vs_t.png``,
``quality_vs_cost.png``), the markdown ``report.md``, and for both run kinds the JSON-safe report with its
headline metrics and null reasons (:func:`finish_report`), written atomically (:func:`write_report`).

``get_pyplot`` is shared by the other plots (tuning, analysis).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from o2mkd_ray.core.atomic import replace_file, write_json, write_text


def get_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_agreement(agreement: pd.DataFrame, boundaries, path: str | Path) -> Path:
    """``agreement_vs_t.png``: per-bucket output MSE against t, a colour per segment, boundaries as vertical
    lines."""
    plt = get_pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, grp in agreement.groupby("segment", sort=True):
        c = colors[int(k) % len(colors)]
        ax.hlines(grp["mse"], grp["t_lo"], grp["t_hi"], colors=c, lw=2)
        ax.plot((grp["t_lo"] + grp["t_hi"]) / 2, grp["mse"], "o", ms=3, color=c, label=f"student {int(k)}")
    for i, b in enumerate(list(boundaries)[1:-1]):
        ax.axvline(b, color="k", ls="--", lw=0.8, label="segment boundary" if i == 0 else None)
    if (agreement["mse"] > 0).all():
        ax.set_yscale("log")
    ax.set_xlim(0, boundaries[-1])
    ax.set_xlabel("timestep t")
    ax.set_ylabel("MSE(student, teacher output)")
    ax.set_title("teacher agreement per timestep bucket", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with replace_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def plot_quality_vs_cost(points: list[dict], backend: str, path: str | Path) -> Path:
    """``quality_vs_cost.png``: FID vs data against MACs per image (left) and latency (right), a point per
    model."""
    plt = get_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for ax, key, label, scale in ((axes[0], "macs_per_image", "MMACs per image (whole sampling run)", 1e-6),
                                  (axes[1], "latency_s", "seconds per batch (median)", 1.0)):
        for p in points:
            if p.get("fid") is None or p.get(key) is None:
                continue
            ax.scatter(p[key] * scale, p["fid"], s=30)
            ax.annotate(p["name"], (p[key] * scale, p["fid"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(f"FID vs data ({backend})")
        ax.margins(0.25)
    fig.suptitle("quality vs cost (lower-left is better)", fontsize=9)
    fig.tight_layout()
    with replace_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def _table(df: pd.DataFrame) -> str:
    try:
        return df.to_markdown(index=False, floatfmt=".4g")
    except ImportError:  # tabulate not installed
        return "```\n" + df.to_string(index=False) + "\n```"


def finite_json(obj, path: str, nulls: dict):
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None with a reason in ``nulls``."""
    if isinstance(obj, dict):
        return {k: finite_json(v, f"{path}.{k}" if path else str(k), nulls) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v, f"{path}[{i}]", nulls) for i, v in enumerate(obj)]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        if math.isfinite(obj):
            return float(obj)
        nulls.setdefault(path, f"not finite ({obj}); reported as null")
        return None
    return obj


def finish_report(report: dict, metrics: dict, reasons: dict[str, str] | None = None) -> dict:
    """The report as written: JSON-safe (:func:`finite_json`), with ``metrics`` and ``null_reasons``.

    Every null gets a reason: ``reasons`` given by the caller (e.g. a step that was skipped), a FID/KID pair's
    own ``null_reason``, a latency ``speedup`` of None (O2MKD timed at 0 s), else "not finite".

    Args:
        report: the nested report (numpy scalars and non-finite floats allowed).
        metrics: flat ``{name: number}`` headline numbers, for experiment tracking; None and non-finite values
            are left out.
        reasons: ``{dotted.path: reason}`` for fields the caller left null on purpose.
    Returns:
        A new dict: the JSON-safe report plus ``metrics`` and ``null_reasons``.
    """
    nulls = dict(reasons or {})
    lat = report.get("latency")
    if isinstance(lat, dict) and lat.get("speedup") is None:
        nulls["latency.speedup"] = "O2MKD sampling time measured as 0 s; no ratio"
    out = finite_json(report, "", nulls)
    for pair, vals in (out.get("fid") or {}).items():  # fid_kid's reasons are more precise than "not finite"
        if isinstance(vals, dict) and "null_reason" in vals:
            for key in ("fid", "kid", "kid_std"):
                if vals.get(key) is None:
                    nulls[f"fid.{pair}.{key}"] = vals["null_reason"]
    out["metrics"] = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
    out["null_reasons"] = nulls
    return out


def write_report(folder: str | Path, report: dict, files: list, *, json_name: str = "report.json",
                 markdown: str | None = None) -> dict:
    """Writes ``report.md`` (when ``markdown`` is given) and the JSON report into ``folder``, each atomically.

    Args:
        folder: the evaluation folder (exists).
        report: from :func:`finish_report`; its ``files`` is set to the written paths, then ``files``.
        files: other files of the evaluation (plots), listed after the reports.
        json_name: the JSON report's file name.
        markdown: the text of ``report.md``.
    Returns:
        ``report`` (updated in place).
    """
    folder = Path(folder)
    written = ([folder / "report.md"] if markdown is not None else []) + [folder / json_name]
    report["files"] = [str(f) for f in dict.fromkeys([*written, *map(Path, files)])]
    if markdown is not None:
        write_text(folder / "report.md", markdown)
    write_json(folder / json_name, report)
    return report


def markdown_report(report: dict) -> str:
    """``report.md`` of an unconditional evaluation, from the finished report (:func:`finish_report`)."""
    s, tr, cost, lat = report["settings"], report["trajectory"], report["cost"], report["latency"]
    per_seg = pd.DataFrame(report["agreement"]["per_segment"])
    fid = {k: v for k, v in report["fid"].items() if isinstance(v, dict)}
    cols = ("fid", "kid", "kid_std", "n_a", "n_b")
    fid_df = pd.DataFrame([{"pair": k.replace("_vs_", " vs "), **{c: v.get(c) for c in cols}}
                           for k, v in fid.items()])
    cost_df = pd.DataFrame([{"model": "teacher", "params": cost["teacher"]["params"],
                             "macs_per_step": cost["teacher"]["macs_per_step"], "steps_in_run": cost["steps"],
                             "macs_per_run": cost["teacher"]["macs_per_run"]}]
                           + [{"model": f"student {r['segment']} [{r['t_lo']}, {r['t_hi']})",
                               "params": r["params"], "macs_per_step": r["macs_per_step"],
                               "steps_in_run": r["steps_in_run"], "macs_per_run": r["macs_in_run"]}
                              for r in cost["students"]]
                           + [{"model": "O2MKD total", "params": cost["o2mkd"]["params_total"],
                               "macs_per_step": cost["o2mkd"]["mean_macs_per_step"],
                               "steps_in_run": cost["steps"],
                               "macs_per_run": cost["o2mkd"]["macs_per_run"]}])
    lat_df = pd.DataFrame([{"model": "teacher", "seconds (median)": lat["teacher_s"]},
                           {"model": "O2MKD", "seconds (median)": lat["o2mkd_s"]}])
    traj_df = pd.DataFrame([{k: tr.get(k) for k in ("mse_mean", "mse_max", "psnr_mean_db", "psnr_min_db",
                                                    "num_capped")}])
    speed = f"{lat['speedup']:.3g}×" if lat.get("speedup") else "n/a"
    return "\n".join([
        f"# O2MKD evaluation: {report['name']}", "",
        f"Run `{report['run']}`: {report['num_segments']} students, boundaries {report['boundaries']}. "
        f"DDIM eta=0, {s['steps']} steps, {s['num_images']} images, seed {s['seed']}, "
        f"device {s['device']}.", "",
        "## Teacher agreement (output MSE, student vs teacher, per segment)", "",
        f"{s['agreement_samples']} draws of (x_0, ε, t), t on a jittered grid over [0, T); overall MSE "
        f"{report['agreement']['overall_mse']:.4g}. `teacher_task_mse` is the teacher's own error against "
        "the ground truth of its parameterisation (the true ε, v or x_0), for scale. Plot: `agreement_vs_t.png`.", "",
        _table(per_seg), "",
        "## Trajectory fidelity (same noise, teacher vs O2MKD final images in [0, 1])", "",
        tr["psnr_note"] + ". Grid: `samples_grid.png`.", "",
        _table(traj_df), "",
        f"## FID / KID — backend `{report['fid_backend']}`", "",
        f"Backend reason: {report['fid_backend_reason']}. {report['fid']['note']}.", "",
        _table(fid_df), "",
        "## Cost", "",
        f"MACs at batch 1 per network forward; a run is {cost['steps']} DDIM steps. O2MKD/teacher MACs per "
        f"run {cost['macs_ratio_run']:.3g}; largest student / teacher params "
        f"{cost['params_ratio_max_student']:.3g}; all students / teacher params "
        f"{cost['params_ratio_total']:.3g}.", "",
        _table(cost_df), "",
        f"Latency, batch {lat['batch']}, {lat['steps']} steps, median of {lat['repeats']} on {lat['device']} "
        f"({lat['torch_threads']} torch threads): speedup {speed}.", "",
        _table(lat_df), "",
        *([f"Null fields: {json.dumps(report['null_reasons'])}", ""] if report["null_reasons"] else []),
    ])
