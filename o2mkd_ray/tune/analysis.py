"""Per-timestep statistics of the teacher's intermediate features, the box plot of them, and a boundary proposal.

O2MKD splits the timesteps among students because the teacher's intermediate feature distributions change
along t. This module measures them on a fixed sample of ``x_0`` (and a fixed ε per image, so only t moves) and
proposes segment boundaries where they shift most: the optimal k-segmentation of the standardised statistics
trajectory (exact dynamic programming over the timestep grid, minimising the within-segment sum of squares).

Text-to-image teachers are measured on the data distill trains their students on
(:func:`~o2mkd_ray.distill.run_folder.run_dataset`): ``x_0`` are the caption latents and each is fed with its own
caption's conditioning. Not the empty prompt: the students are trained (and sampled, the conditional branch of
guidance) mostly on captions, and cross-attention makes the features depend on the text, so statistics under the
empty prompt alone would describe the branch the students see least (``data.uncond_prob``). The latents and
embeddings are cached as a distill run caches them (``OUT/cache``), so a later ``distill`` into the same folder
reuses them.

Plain torch (no Ray). ``analyze(cfg, OUT)`` writes ``OUT/analysis/``: ``feature_boxplot.png``, ``stats.csv``,
``boundaries.yaml`` (a config snippet ``segments: {boundaries: [...]}``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import yaml

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.atomic import replace_file, write_text
from o2mkd_ray.core.conditioning import call_denoiser, cond_kwargs
from o2mkd_ray.core.teacher import batch_cond
from o2mkd_ray.errors import ConfigError

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


MAX_QUANTILE_VALUES = 200_000  # activations per (t, block) for the quantiles: a fixed random subset above this


def _qname(q: float) -> str:
    return f"q{round(q * 100):02d}"


def stat_columns(quantiles: Sequence[float] = DEFAULT_QUANTILES) -> list[str]:
    """Statistic columns of :func:`feature_stats`: ``mean, std, q05, q25, q50, q75, q95`` by default."""
    return ["mean", "std", *(_qname(q) for q in quantiles)]


def timestep_grid(num_train_timesteps: int, num: int) -> list[int]:
    """``num`` distinct integer timesteps spread evenly over ``[0, T-1]`` (fewer when ``num > T``)."""
    if num < 2:
        raise ConfigError(f"analysis: need at least 2 timesteps on the grid, got {num}")
    return sorted({int(round(v)) for v in np.linspace(0, num_train_timesteps - 1, num)})


def _hooked_blocks(teacher: torch.nn.Module, blocks: Sequence[str] | None) -> list[str]:
    # the blocks to hook: the named ones (all of them must exist), else every hookable one
    from o2mkd_ray.core.features import statistics_blocks

    available = statistics_blocks(teacher)
    blocks = list(blocks) if blocks else available
    if not blocks:
        raise ConfigError(f"analysis: the teacher ({type(teacher).__name__}) has no hookable blocks (a UNet's "
                          "down_blocks / mid_block / up_blocks, or transformer_blocks); feature statistics need one")
    missing = [b for b in blocks if b not in available]
    if missing:
        raise ConfigError(f"analysis: teacher has no block(s) {missing}; available: {available}")
    return blocks


def _fixed_sample(dataset, num_images: int, seed: int) -> tuple[list, torch.Tensor]:
    # num_images items (the dataset repeated if smaller) and one ε each, from one generator: the same at every t
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g)
    idx = order.repeat(math.ceil(num_images / len(dataset)))[:num_images]
    items = [dataset[int(i)] for i in idx]
    return items, torch.randn((len(items), *items[0][0].shape), generator=g)


def _activations(teacher, hooks, blocks: list[str], scheduler, items: list, eps, t: int, batch_size: int) -> dict:
    # every hooked block's output activations at timestep t, flattened over the whole sample
    p = next(teacher.parameters())
    acts: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}
    for s in range(0, len(items), batch_size):
        batch, eps_b = items[s:s + batch_size], eps[s:s + batch_size]
        x0_b = torch.stack([it[0] for it in batch]).float()  # (B, C, H, W)
        t_b = torch.full((len(x0_b),), int(t), dtype=torch.long)
        hooks.clear()
        call_denoiser(teacher, scheduler.add_noise(x0_b, eps_b, t_b).to(p.device, p.dtype), t_b.to(p.device),
                      **cond_kwargs(batch_cond(batch), p.device, p.dtype))
        for b in blocks:
            acts[b].append(hooks.features[b].float().flatten().cpu())
    return {b: torch.cat(a).double() for b, a in acts.items()}


def _summary(v: torch.Tensor, quantiles: Sequence[float], max_values: int, seed: int) -> list[float]:
    # mean and std of all values, quantiles of at most max_values of them (a subset fixed by seed)
    sub = v
    if len(v) > max_values:  # torch.quantile has a size limit and sorts: a fixed subset is enough
        sub = v[torch.randint(len(v), (max_values,), generator=torch.Generator().manual_seed(seed))]
    qs = torch.quantile(sub, torch.tensor(list(quantiles), dtype=torch.float64)).tolist()
    return [v.mean().item(), v.std().item(), *qs]


@torch.no_grad()
def teacher_feature_stats(teacher: torch.nn.Module, scheduler, dataset, timesteps: Sequence[int],
                          num_images: int = 64, blocks: Sequence[str] | None = None, seed: int = 0,
                          batch_size: int = 64, quantiles: Sequence[float] = DEFAULT_QUANTILES,
                          max_values: int = MAX_QUANTILE_VALUES) -> pd.DataFrame:
    """Distribution of each hooked block's output activations at each timestep.

    The same ``num_images`` images ``x_0`` (with their conditioning, if any) and the same noise ε are used at
    every t, so the rows differ only by ``x_t = add_noise(x_0, ε, t)``.

    Args:
        teacher: the denoiser (a diffusers UNet, or a transformer with ``transformer_blocks`` such as DiT).
        scheduler: its training noise scheduler (``add_noise``).
        dataset: items ``(x_0,)`` with ``x_0: (C, H, W)``, or ``(x_0, cond)`` for a text-to-image teacher (the
            conditioning goes to the UNet through :func:`~o2mkd_ray.core.teacher.cond_kwargs`).
        timesteps: the grid of t.
        num_images: images drawn from the dataset (fixed generator; repeated if the dataset is smaller).
        blocks: block names; None: every :func:`~o2mkd_ray.core.features.statistics_blocks` entry (a UNet's
            blocks, or a transformer's ``transformer_blocks.i``).
        seed: generator seed for the images, the noise and the quantile subsets.
        batch_size: forward batch.
        quantiles: quantile levels (the box plot uses 5/25/50/75/95 %).
        max_values: quantiles are taken over at most this many activations per (t, block) (a fixed random
            subset); mean and std always use all of them.
    Returns:
        One row per (t, block): ``t, block, mean, std, q05, ..., q95``.
    Raises:
        ConfigError: the teacher has no hookable blocks, or a named block does not exist.
    """
    from o2mkd_ray.core.features import FeatureHooks

    blocks = _hooked_blocks(teacher, blocks)
    items, eps = _fixed_sample(dataset, num_images, seed)
    cols = stat_columns(quantiles)
    rows = []
    with FeatureHooks(teacher, blocks, detach=True) as hooks:
        for t in timesteps:
            acts = _activations(teacher, hooks, blocks, scheduler, items, eps, int(t), batch_size)
            rows += [{"t": int(t), "block": b, **dict(zip(cols, _summary(v, quantiles, max_values,
                                                                         seed * 100_003 + int(t))))}
                     for b, v in acts.items()]
    return pd.DataFrame(rows)


def feature_stats(cfg: Config, num_images: int = 64, num_timesteps: int = 50, blocks: Sequence[str] | None = None,
                  seed: int = 0, device: str | None = None, out: str | Path | None = None) -> pd.DataFrame:
    """:func:`teacher_feature_stats` for the teacher and dataset of a config, on an even grid of timesteps.

    The dataset is the one distill trains on (:func:`~o2mkd_ray.distill.run_folder.run_dataset`): for a
    text-to-image teacher, the caption latents each with its caption's conditioning (see the module docstring
    for why captions rather than the empty prompt).

    Args:
        cfg: the run config (``teacher``, ``data``; ``kd.feature_blocks`` when ``blocks`` is None).
        num_images: images per timestep.
        num_timesteps: grid points over ``[0, T-1]``.
        blocks: block names; None: ``kd.feature_blocks``, else every hookable block.
        seed: generator seed.
        device: default CUDA when available, else CPU.
        out: a folder whose ``cache/`` keeps a text-to-image teacher's caption latents and embeddings (as a
            run folder does); None computes them without caching.
    Returns:
        See :func:`teacher_feature_stats`; ``df.attrs["num_train_timesteps"]`` holds T.
    """
    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.distill.run_folder import run_dataset

    if num_images < 1:
        raise ConfigError(f"analysis: --images must be >= 1, got {num_images}")
    teacher, scheduler = load_teacher(cfg.teacher)
    teacher.to(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")))
    T = int(scheduler.config.num_train_timesteps)
    grid = timestep_grid(T, num_timesteps)
    dataset, _ = run_dataset(cfg, Path(out).expanduser() if out is not None else None, teacher, scheduler)
    df = teacher_feature_stats(teacher, scheduler, dataset, grid, num_images, blocks or cfg.kd.feature_blocks,
                               seed)
    df.attrs["num_train_timesteps"] = T
    return df


def stats_trajectory(stats: pd.DataFrame, columns: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The standardised statistics trajectory: one row per timestep, one column per (block, statistic).

    Each column is z-scored over t (constant columns are dropped), so every block and statistic weighs the
    same in the segmentation whatever its scale.

    Returns:
        ``(timesteps (m,), X (m, d))``.
    """
    columns = list(columns or [c for c in stats.columns if c not in ("t", "block", "segment")])
    wide = stats.pivot(index="t", columns="block", values=columns).sort_index()
    X = wide.to_numpy(dtype=np.float64)
    sd = X.std(0)
    keep = sd > 1e-12 * (1 + np.abs(X).max(0))
    X = (X[:, keep] - X[:, keep].mean(0)) / sd[keep]
    return wide.index.to_numpy(dtype=np.int64), X


def _segment_costs(X: np.ndarray) -> np.ndarray:
    # C[i, j] = Σ_{i<=r<j} |x_r - mean(x_i..x_{j-1})|² from prefix sums; +inf where j <= i
    m = len(X)
    s1 = np.vstack([np.zeros((1, X.shape[1])), np.cumsum(X, 0)])  # (m+1, d)
    s2 = np.concatenate([[0.0], np.cumsum((X ** 2).sum(1))])  # (m+1,)
    i, j = np.triu_indices(m + 1, k=1)
    diff = s1[j] - s1[i]
    C = np.full((m + 1, m + 1), np.inf)
    C[i, j] = np.maximum(0.0, (s2[j] - s2[i]) - (diff ** 2).sum(1) / (j - i))
    return C


def segmentation_cost(X: np.ndarray, starts: Sequence[int]) -> float:
    """Within-segment sum of squares of ``X`` cut before the row indices ``starts``."""
    X = np.asarray(X, np.float64).reshape(len(X), -1)
    edges = [0, *starts, len(X)]
    return float(sum(((X[a:b] - X[a:b].mean(0)) ** 2).sum() for a, b in zip(edges[:-1], edges[1:])))


def optimal_segmentation(X: np.ndarray, n: int, min_size: int = 1) -> list[int]:
    """Optimal split of a sequence into ``n`` contiguous pieces, minimising the total within-piece sum of squares.

    Exact dynamic programming, O(n·m²) for m rows: ``D[k, j] = min_i D[k-1, i] + C[i, j]`` where ``C[i, j]``
    is the sum of squares of rows ``i..j-1`` about their mean.

    Args:
        X: ``(m,)`` or ``(m, d)`` sequence.
        n: number of pieces, ``1 <= n <= m // min_size``.
        min_size: fewest rows per piece.
    Returns:
        The ``n - 1`` start indices of pieces 1..n-1 (strictly increasing, in ``[min_size, m - min_size]``).
    """
    X = np.asarray(X, np.float64)
    X = X.reshape(len(X), -1)
    m = len(X)
    if n < 1 or min_size < 1 or n * min_size > m:
        raise ConfigError(f"analysis: cannot split {m} timesteps into {n} segments of at least {min_size}; "
                          f"use n <= {m // max(1, min_size)} or more timesteps")
    C = _segment_costs(X)
    D = np.full((n + 1, m + 1), np.inf)
    arg = np.zeros((n + 1, m + 1), dtype=np.int64)
    D[0, 0] = 0.0
    for k in range(1, n + 1):
        for j in range(k * min_size, m - (n - k) * min_size + 1):
            i = np.arange((k - 1) * min_size, j - min_size + 1)
            tot = D[k - 1, i] + C[i, j]
            best = int(np.argmin(tot))
            D[k, j], arg[k, j] = tot[best], i[best]
    starts, j = [], m
    for k in range(n, 1, -1):
        j = int(arg[k, j])
        starts.append(j)
    return sorted(starts)


def boundaries_from_starts(timesteps: Sequence[int], starts: Sequence[int], num_train_timesteps: int) -> list[int]:
    """Segment boundaries ``[0, b_1, ..., T]``: each cut halfway between the grid points on either side of it."""
    t = [int(v) for v in timesteps]
    return [0, *((t[c - 1] + t[c] + 1) // 2 for c in starts), int(num_train_timesteps)]


def propose_boundaries(cfg: Config, n: int | None = None, num_images: int = 64, num_timesteps: int = 50,
                       blocks: Sequence[str] | None = None, seed: int = 0, stats: pd.DataFrame | None = None,
                       min_size: int = 1) -> list[int]:
    """Segment boundaries where the teacher's feature statistics shift most.

    Args:
        cfg: the run config (teacher, data).
        n: number of segments (default ``cfg.segments.n``).
        num_images, num_timesteps, blocks, seed: see :func:`feature_stats` (ignored with ``stats``).
        stats: precomputed :func:`feature_stats` (its ``attrs["num_train_timesteps"]`` must hold T).
        min_size: fewest grid timesteps per segment.
    Returns:
        ``[0, b_1, ..., T]``, strictly increasing, ``n + 1`` entries (use as ``segments.boundaries``).
    """
    n = cfg.segments.n if n is None else n
    if stats is None:
        stats = feature_stats(cfg, num_images, num_timesteps, blocks, seed)
    T = stats.attrs.get("num_train_timesteps")
    if T is None:
        raise ConfigError("analysis: stats has no attrs['num_train_timesteps']; build it with feature_stats()")
    timesteps, X = stats_trajectory(stats)
    if X.shape[1] == 0:  # every statistic constant over t: nothing to locate, fall back to equal pieces
        from o2mkd_ray.core.segments import Segments

        return list(Segments.uniform(T, n).boundaries)
    return boundaries_from_starts(timesteps, optimal_segmentation(X, n, min_size), T)


def plot_feature_boxplot(stats: pd.DataFrame, boundaries: Sequence[int] | None, path: str | Path,
                         max_boxes: int = 25) -> Path:
    """``feature_boxplot.png``: per-timestep activation distributions, one panel per block.

    Boxes span the 25-75 % quantiles with the median, whiskers 5-95 %, a marker at the mean; proposed
    boundaries are dashed lines.
    """
    from o2mkd_ray.eval.report import get_pyplot

    plt = get_pyplot()
    blocks = list(dict.fromkeys(stats["block"]))
    ts = sorted(stats["t"].unique())
    if len(ts) > max_boxes:  # every k-th grid point: evenly spaced boxes
        ts = ts[::math.ceil(len(ts) / max_boxes)]
    T = stats.attrs.get("num_train_timesteps") or (boundaries[-1] if boundaries else max(ts) + 1)
    width = 0.6 * (min(np.diff(ts)) if len(ts) > 1 else T / 10)
    fig, axes = plt.subplots(len(blocks), 1, figsize=(9, 1.7 * len(blocks) + 0.8), sharex=True, squeeze=False)
    for ax, b in zip(axes[:, 0], blocks):
        rows = stats[(stats["block"] == b) & stats["t"].isin(ts)].sort_values("t")
        bxp = [{"med": r.q50, "q1": r.q25, "q3": r.q75, "whislo": r.q05, "whishi": r.q95, "mean": r.mean,
                "fliers": [], "label": str(r.t)} for r in rows.itertuples()]
        ax.bxp(bxp, positions=rows["t"].tolist(), widths=width, showmeans=True, showfliers=False,
               manage_ticks=False, meanprops={"marker": ".", "markersize": 4})
        for i, cut in enumerate(list(boundaries or [])[1:-1]):
            ax.axvline(cut, color="C3", ls="--", lw=0.9, label="proposed boundary" if i == 0 else None)
        ax.set_ylabel(b, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_title("teacher feature activations per timestep (box 25-75 %, whiskers 5-95 %, · mean)",
                         fontsize=9)
    if boundaries is not None and len(boundaries) > 2:
        axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlim(-width, T - 1 + width)
    axes[-1, 0].set_xlabel("timestep t")
    fig.tight_layout()
    with replace_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def analyze(cfg: Config, out: str | Path, n: int | None = None, num_images: int = 64, num_timesteps: int = 50,
            blocks: Sequence[str] | None = None, seed: int = 0) -> dict:
    """Measures the teacher's per-timestep feature statistics, proposes boundaries and writes ``OUT/analysis/``.

    Args:
        cfg: the run config.
        out: output folder; files go to ``out/analysis/`` (a text-to-image teacher's caption latents and
            embeddings to ``out/cache/``, as in a run folder).
        n: number of segments (default ``cfg.segments.n``).
        num_images, num_timesteps, blocks, seed: see :func:`feature_stats`.
    Returns:
        ``boundaries``, ``n``, ``within_ss`` (of the proposal) and ``within_ss_uniform`` (equal segments),
        both on the standardised trajectory, and ``files``.
    """
    from o2mkd_ray.core.segments import Segments

    n = cfg.segments.n if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"analysis: --n must be an integer >= 1, got {n!r}")
    stats = feature_stats(cfg, num_images, num_timesteps, blocks, seed, out=out)
    T = stats.attrs["num_train_timesteps"]
    boundaries = propose_boundaries(cfg, n, stats=stats)
    timesteps, X = stats_trajectory(stats)
    seg = Segments(boundaries)
    uniform = Segments.uniform(T, n)

    def starts(s: Segments) -> list[int]:
        owners = np.asarray([s.owner(int(t)) for t in timesteps])
        return [int(i) for i in np.flatnonzero(np.diff(owners)) + 1]

    d = Path(out).expanduser() / "analysis"
    d.mkdir(parents=True, exist_ok=True)
    table = stats.assign(segment=[seg.owner(int(t)) for t in stats["t"]])
    with replace_file(d / "stats.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot = plot_feature_boxplot(stats, boundaries, d / "feature_boxplot.png")
    snippet = d / "boundaries.yaml"
    blocks_used = list(dict.fromkeys(stats["block"]))
    write_text(
        snippet,
        f"# proposed by `o2mkd-ray analyze` for {cfg.name!r}: optimal {n}-segmentation of the teacher's feature\n"
        f"# statistics over {len(timesteps)} timesteps x {num_images} images (blocks: {', '.join(blocks_used)})\n"
        + yaml.safe_dump({"segments": {"boundaries": boundaries}}, default_flow_style=None, sort_keys=False))
    return {"n": n, "boundaries": boundaries, "num_train_timesteps": T, "blocks": blocks_used,
            "within_ss": segmentation_cost(X, starts(seg)) if X.size else 0.0,
            "within_ss_uniform": segmentation_cost(X, starts(uniform)) if X.size else 0.0,
            "files": [str(d / "stats.csv"), str(plot), str(snippet)]}
