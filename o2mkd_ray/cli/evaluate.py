"""``o2mkd-ray eval OUT``: (re)evaluate a run.
"""

from __future__ import annotations

import json

from o2mkd_ray.eval.evaluate import evaluate_run


def add_eval_parser(subparsers):
    """Adds ``eval OUT [--num-images N] [--steps S]`` to an argparse subparsers object; returns the parser."""
    p = subparsers.add_parser("eval", help="evaluate a distill run against its teacher: image fidelity, FID/KID, "
                                           "cost, latency; agreement per timestep (unconditional) or CLIP score "
                                           "(text-to-image); writes OUT/eval/")
    p.add_argument("out", help="run folder written by `o2mkd-ray distill --out OUT`")
    p.add_argument("--num-images", type=int, default=None, help="images per model (default eval.num_images)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default eval.steps): DDIM for unconditional runs, the run's own "
                        "scheduler for text-to-image runs")
    return p


def run_eval_cli(args) -> int:
    """Runs :func:`evaluate_run` for parsed ``eval`` arguments; prints headline metrics and files as JSON."""
    report = evaluate_run(args.out, num_images=args.num_images, steps=args.steps)
    print(json.dumps({"out": report["run"], "fid_backend": report.get("fid_backend"),
                      "metrics": report["metrics"], "files": report["files"]}, indent=2))
    return 0
