"""``o2mkd-ray analyze CONFIG``: teacher feature statistics and a boundary proposal.
"""

from __future__ import annotations

import json
from pathlib import Path

from o2mkd_ray.tune.analysis import analyze


def add_analyze_parser(subparsers):
    """Adds ``analyze CONFIG [--n N] [--out DIR] [--set ...] [--images K] [--timesteps M] [--seed S]``.

    Args:
        subparsers: an argparse subparsers object.
    Returns:
        The ``analyze`` parser.
    """
    p = subparsers.add_parser("analyze", help="teacher feature statistics per timestep (box plot) and a "
                                              "boundary proposal (writes OUT/analysis/)")
    p.add_argument("config", help="pipelines/*.yaml")
    p.add_argument("--n", type=int, default=None, help="number of segments (default segments.n)")
    p.add_argument("--out", default=None, help="output folder (default runs/<name>-analysis)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--images", type=int, default=64, help="images x_0 per timestep (default 64)")
    p.add_argument("--timesteps", type=int, default=50, help="timestep grid points over [0, T) (default 50)")
    p.add_argument("--seed", type=int, default=0)
    return p


def run_analyze_cli(args) -> int:
    """Runs :func:`analyze` for parsed ``analyze`` arguments; prints the proposal and files as JSON.

    Args:
        args: from the parser of :func:`add_analyze_parser`.
    Returns:
        The exit code (0).
    """
    from o2mkd_ray.config.loading import load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or f"runs/{cfg.name}-analysis")
    res = analyze(cfg, out, n=args.n, num_images=args.images, num_timesteps=args.timesteps, seed=args.seed)
    print(json.dumps({"segments": {"boundaries": res["boundaries"]}, "within_ss": res["within_ss"],
                      "within_ss_uniform": res["within_ss_uniform"], "files": res["files"]}, indent=2))
    return 0
