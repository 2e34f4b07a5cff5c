"""The results of a tune search: the results table (``results.csv``), the Pareto front of quality vs cost
(``pareto.png``) and the best finished trial as a full, ready-to-run config (``best.yaml``); also ends the
MLflow runs of trials that never finished.

Used by :func:`o2mkd_ray.tune.search.run_tuning`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from o2mkd_ray.core.atomic import replace_file, write_text
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.tune.cuts import CUTS_KEY
from o2mkd_ray.tune.resolve import config_leaves, resolve_trial_config, to_builtin
from o2mkd_ray.tune.space import PER_SEGMENT_KEYS, SearchSpace

log = logging.getLogger(__name__)


def _config_columns(tc, others: list[str]) -> dict[str, Any]:
    # a trial's segments, widths (one per segment) and the other tuned keys, from its resolved config
    w = tc.students.width
    row: dict[str, Any] = {"n": tc.segments.n, "boundaries": json.dumps(tc.segments.boundaries),
                           "widths": json.dumps(w if isinstance(w, list) else [w] * tc.segments.n)}
    if tc.students.layers_per_block is not None:
        row["layers_per_block"] = json.dumps(tc.students.layers_per_block)
    flat = config_leaves(tc.to_dict())
    return {**row, **{k: flat.get(k) for k in others}}


def _trial_row(r, i: int, sp: SearchSpace, trial_base: dict, T: int, teacher, shape, tdir: Path,
               others: list[str]) -> dict[str, Any]:
    # one row of the results table for one Tune result
    from o2mkd_ray.tune.trial import sampling_cost

    m = dict(r.metrics or {})
    tid = Path(r.path).name if r.path else m.get("trial_id", f"trial-{i}")
    status = "ERROR" if r.error else "TERMINATED" if m.get("final") else "STOPPED"
    row: dict[str, Any] = {"trial_id": tid, "status": status}
    try:
        tc = resolve_trial_config(trial_base, {**sp.constants(), **(r.config or {})}, T)
        row.update(_config_columns(tc, others))
        cost = m.get("cost")
        if cost is None:  # a trial that never reported: its cost from its config
            cost = sampling_cost(tc, teacher, shape)["cost"]
    except ConfigError as e:
        row["error"] = str(e)
        cost = None
    quality = m.get("quality") if status == "TERMINATED" else None
    row.update(quality=quality if quality is not None else np.nan, cost=cost if cost is not None else np.nan,
               val_loss=m.get("val_loss", np.nan), steps=int(m.get("step", 0) or 0),
               objective=sp.search["objective"], out=str(tdir / "trials" / tid))
    if r.error:
        row["error"] = (str(r.error).strip().splitlines() or [type(r.error).__name__])[-1][:300]
    return row


def results_frame(grid, sp: SearchSpace, trial_base: dict, T: int, teacher, shape, tdir: Path) -> pd.DataFrame:
    """The results table of a search.

    Args:
        grid: Tune's ResultGrid (or a sequence of results with ``path, config, metrics, error``).
        sp: the space; trial_base: the config dict trials started from; T: the teacher's timesteps.
        teacher, shape: for the cost of trials that never reported one; tdir: ``OUT/tune``.
    Returns:
        One row per trial, sorted by ``trial_id``: ``trial_id, status`` (TERMINATED, STOPPED or ERROR), ``n,
        boundaries, widths``, the other tuned keys, ``quality, cost, val_loss, steps, objective, out, error,
        pareto``, and ``best`` (False until :func:`write_outputs`).
    """
    others = [p.key for p in sp.params.values()
              if not p.per_segment and p.dist != "ordered_cuts" and p.key not in ("segments.n", CUTS_KEY)]
    df = pd.DataFrame([_trial_row(grid[i], i, sp, trial_base, T, teacher, shape, tdir, others)
                       for i in range(len(grid))])
    for col in ("n", "boundaries", "widths", "error"):
        if col not in df:
            df[col] = None
    df["pareto"] = pareto_front(df)
    df["best"] = False
    return df.sort_values("trial_id", ignore_index=True)


def finished(df: pd.DataFrame) -> pd.Series:
    """True for the rows of trials that ran to the end with a finite ``quality``."""
    return (df.get("status") == "TERMINATED") & np.isfinite(df["quality"].astype(float))


def pareto_front(df: pd.DataFrame) -> pd.Series:
    """True for finished rows no other finished row beats in both ``quality`` and ``cost`` (lower is better)."""
    ok = finished(df) & np.isfinite(df["cost"].astype(float))
    q, c = df["quality"].to_numpy(float), df["cost"].to_numpy(float)
    front = np.zeros(len(df), dtype=bool)
    idx = np.flatnonzero(ok.to_numpy())
    for i in idx:
        dominated = any(q[j] <= q[i] and c[j] <= c[i] and (q[j] < q[i] or c[j] < c[i]) for j in idx if j != i)
        front[i] = not dominated
    return pd.Series(front, index=df.index)


def plot_pareto(df: pd.DataFrame, path: str | Path, objective: str, max_cost: float | None = None,
                best: str | None = None) -> Path:
    """``pareto.png``: quality against cost for finished trials, the Pareto front joined, the best starred."""
    from o2mkd_ray.eval.report import get_pyplot

    plt = get_pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    fin = df[finished(df)]
    ax.scatter(fin["cost"], fin["quality"], s=24, color="0.6", label="finished trial")
    front = fin[fin["pareto"]].sort_values("cost")
    # steps: everything up and to the right of the line is dominated
    ax.plot(front["cost"], front["quality"], "o-", color="C3", ms=6, lw=1.2, drawstyle="steps-post",
            label="Pareto front")
    for r in fin.itertuples():
        ax.annotate(f"{r.trial_id.rsplit('_', 1)[-1]} n={r.n}", (r.cost, r.quality), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    if best is not None and best in set(fin["trial_id"]):
        b = fin[fin["trial_id"] == best].iloc[0]
        ax.scatter([b["cost"]], [b["quality"]], marker="*", s=180, color="C2", zorder=5, label="best.yaml")
    if max_cost is not None:
        ax.axvline(max_cost, color="k", ls=":", lw=0.9, label=f"max cost {max_cost:g}")
    if len(fin) and (fin["quality"] > 0).all():
        ax.set_yscale("log")
    stopped = int((df["status"] == "STOPPED").sum())
    errors = int((df["status"] == "ERROR").sum())
    ax.set_xlabel("cost: student MACs per step / teacher MACs (mean over t)")
    ax.set_ylabel(f"quality: {objective} MSE (lower is better)")
    ax.set_title(f"{len(fin)} finished, {stopped} stopped early, {errors} failed", fontsize=9)
    ax.legend(fontsize=7)
    ax.margins(0.15)
    fig.tight_layout()
    with replace_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def write_outputs(df: pd.DataFrame, sp: SearchSpace, base: dict, T: int, tdir: Path, max_cost: float | None,
                  name: str) -> str:
    """Writes ``results.csv`` and ``pareto.png``, then ``best.yaml``: the best finished trial as a full config.

    Args:
        df: from :func:`results_frame`; its ``best`` column is set here.
        sp: the space; base: the base config dict (the full budget); T: the teacher's timesteps.
        tdir: ``OUT/tune``; max_cost: the best trial is taken among those at most this cost; name: config name.
    Returns:
        The best trial's id.
    Raises:
        ConfigError: no finished trial (within ``max_cost``); the table and plot are written first.
    """
    fin = df[finished(df)]
    pool = fin if max_cost is None else fin[fin["cost"] <= max_cost]
    best = pool.sort_values(["quality", "cost"]).iloc[0] if len(pool) else None
    if best is not None:
        df.loc[df["trial_id"] == best["trial_id"], "best"] = True
    with replace_file(tdir / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    plot_pareto(df, tdir / "pareto.png", sp.search["objective"], max_cost,
                best["trial_id"] if best is not None else None)
    if best is None:
        if not len(fin):
            raise ConfigError(f"tune: no trial finished ({len(df)} trials: "
                              f"{df['status'].value_counts().to_dict()}); see {tdir / 'results.csv'}")
        raise ConfigError(f"tune: no finished trial has cost <= {max_cost} (lowest: {fin['cost'].min():.4g}); "
                          f"raise --max-cost; see {tdir / 'results.csv'}")
    _write_best_yaml(best, sp, base, T, tdir / "best.yaml", max_cost, name)
    return str(best["trial_id"])


def _write_best_yaml(best: pd.Series, sp: SearchSpace, base: dict, T: int, path: Path, max_cost: float | None,
                     name: str) -> None:
    # the best row's values on the full-budget base config, as a commented, ready-to-run YAML file
    sampled: dict[str, Any] = {CUTS_KEY: json.loads(best["boundaries"])}  # explicit: the trial's own cuts
    for key in sp.params:
        if key in PER_SEGMENT_KEYS:
            sampled[key] = json.loads(best["widths" if key == "students.width" else "layers_per_block"])
        elif key not in ("segments.n", CUTS_KEY):
            sampled[key] = to_builtin(best[key])
    full = resolve_trial_config(base, sampled, T)
    full.name = f"{name}-tuned"
    header = (f"# best trial {best['trial_id']} of `o2mkd-ray tune` ({sp.source}): {sp.search['objective']} MSE "
              f"{best['quality']:.6g}, cost {best['cost']:.4g} x teacher MACs per step"
              + (f" (max cost {max_cost:g})" if max_cost is not None else "")
              + "\n# full training budget (the space's budget: applied to trials only)\n")
    write_text(path, header + dump_config_yaml(full.to_dict()))


class _ConfigDumper(yaml.SafeDumper):
    """Block-style sections, flow-style lists of scalars (``boundaries: [0, 333, 1000]``), like pipelines/*.yaml."""


_ConfigDumper.add_representer(list, lambda d, v: d.represent_sequence(
    "tag:yaml.org,2002:seq", v, flow_style=all(not isinstance(x, (list, dict)) for x in v)))


def dump_config_yaml(data: dict) -> str:
    """A config dict as YAML in the style of ``pipelines/*.yaml``."""
    return yaml.dump(data, Dumper=_ConfigDumper, sort_keys=False, default_flow_style=False, width=110)


OUTPUT_FILES = ("results.csv", "pareto.png", "best.yaml")


def finish_search_run(parent, df: pd.DataFrame, tdir: Path) -> None:
    """Ends the search's MLflow run: its trials' runs ended, the output files and trial counts logged.

    Args:
        parent: the search's started RunTracker-like run; df: the results table; tdir: ``OUT/tune``.
    """
    close_trial_runs(parent, df)
    parent.log_artifacts([tdir / f for f in OUTPUT_FILES if (tdir / f).is_file()])
    fin = df[df["status"] == "TERMINATED"]
    parent.log_metrics({"num_trials": len(df), "num_finished": len(fin),
                        **({"best_quality": float(fin["quality"].min())} if len(fin) else {})})
    parent.finish("FINISHED")


def close_trial_runs(parent, df: pd.DataFrame) -> None:
    """Ends the MLflow runs that trials left open (ASHA-stopped or crashed trials never end theirs).

    Args:
        parent: the search's RunTracker-like run (``client``, ``run_id``, ``experiment_id``); df: the results table.
    """
    client = getattr(parent, "client", None)
    if client is None or getattr(parent, "run_id", None) is None:
        return
    status = dict(zip(df["trial_id"], df["status"]))
    to = {"STOPPED": "KILLED", "ERROR": "FAILED", "TERMINATED": "FINISHED"}
    try:
        runs = client.search_runs([parent.experiment_id], max_results=1000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
        for r in runs:
            end = to.get(status.get(r.data.tags.get("o2mkd.trial_id")), "KILLED")
            kids = client.search_runs([parent.experiment_id], max_results=1000,
                                      filter_string=f"tags.`mlflow.parentRunId` = '{r.info.run_id}' and "
                                                    "attributes.status = 'RUNNING'")
            for k in kids:
                client.set_terminated(k.info.run_id, end)
            if r.info.status == "RUNNING":
                client.set_terminated(r.info.run_id, end)
    except Exception as e:  # noqa: BLE001 - tracking must not fail the search
        log.warning("MLflow: could not end the stopped trials' runs: %s", e)
