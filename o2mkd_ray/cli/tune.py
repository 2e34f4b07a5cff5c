"""``o2mkd-ray tune CONFIG SPACE``: search boundaries and widths.
"""

from __future__ import annotations

import json
from pathlib import Path

from o2mkd_ray.config.loading import load_config
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.tune.report import OUTPUT_FILES
from o2mkd_ray.tune.resolve import to_builtin
from o2mkd_ray.tune.search import run_tuning


def add_tune_parser(subparsers):
    """Adds ``tune CONFIG SPACE [--num-samples K] [--out DIR] [--set ...] [--max-cost C] [--seed-from-analysis]
    [--no-resume]``.

    Args:
        subparsers: an argparse subparsers object.
    Returns:
        The ``tune`` parser.
    """
    p = subparsers.add_parser("tune", help="Ray Tune over boundaries/widths/KD weights; one trial = one whole "
                                           "O2MKD run (writes OUT/tune/results.csv, pareto.png, best.yaml)")
    p.add_argument("config", help="pipelines/*.yaml (the full budget; the space's budget: reduces trials)")
    p.add_argument("space", help="tune_spaces/*.yaml")
    p.add_argument("--num-samples", type=int, default=None, help="trials (default search.num_samples)")
    p.add_argument("--out", default=None, help="output folder (default runs/<name>-tune)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--max-cost", type=float, default=None,
                   help="best.yaml: the best trial with cost (MACs per step / teacher) at most this")
    p.add_argument("--seed-from-analysis", action="store_true",
                   help="first trials: boundaries proposed from the teacher's features, and uniform ones")
    p.add_argument("--no-resume", action="store_true", help="refuse an --out that already holds a search")
    return p


def run_tune_cli(args) -> int:
    """Runs :func:`run_tuning` for parsed ``tune`` arguments; prints a JSON summary.

    Args:
        args: from the parser of :func:`add_tune_parser`.
    Returns:
        The exit code (0).
    """
    cfg = load_config(args.config, args.overrides)
    if args.num_samples is not None and args.num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {args.num_samples}")
    out = Path(args.out or f"runs/{cfg.name}-tune")
    df = run_tuning(cfg, args.space, out, num_samples=args.num_samples, max_cost=args.max_cost,
                    seed_from_analysis=args.seed_from_analysis, resume=not args.no_resume, verbose=1)
    best = df[df["best"]].iloc[0]
    tdir = out.expanduser().resolve() / "tune"
    print(json.dumps({
        "trials": df["status"].value_counts().to_dict(),
        "best": {"trial_id": best["trial_id"], "quality": float(best["quality"]), "cost": float(best["cost"]),
                 "boundaries": json.loads(best["boundaries"]), "widths": json.loads(best["widths"])},
        "pareto": df[df["pareto"]][["trial_id", "quality", "cost"]].to_dict("records"),
        "files": [str(tdir / f) for f in OUTPUT_FILES],
    }, indent=2, default=to_builtin))
    return 0
