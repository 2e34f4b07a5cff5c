"""O2MKD against one-to-one KD at small scale: the paper's claim (arXiv 2410.04191), side by side in one run.

Three distillations of the same teacher into students of the same width ``w`` (each with ``run_local``: no
Ray, segments one after another), then ``evaluate_run`` on each:

  o2mkd_n3           N=3 students, S steps each            (3·S student steps in all)
  one_to_one_n1      N=1 student on all timesteps, S steps (the same per-student budget)
  o2mkd_n3_equal     N=3 students, S/3 steps each          (S in all: the same total compute as one_to_one_n1)

Printed per run: teacher agreement (ε MSE against the teacher on each third of [0, T), whatever N is, so the
columns compare like with like), trajectory fidelity (DDIM eta=0 from the same noise: MSE / PSNR of the final
images), FID/KID against the dataset and against teacher samples (backend named in the output), and cost.

    python benchmarks/fidelity.py --steps 600 --width 0.5 --out runs/bench_fidelity
    python benchmarks/fidelity.py --teacher tiny --steps 30 --out /tmp/bench_fid   # smoke test, seconds

``--teacher`` defaults to the embedded digits teacher (``o2mkd_ray/assets/digits_teacher``); ``tiny`` builds a
random 8×8 UNet (a smoke test of the pipeline only: its numbers are not evidence); any other value is a
diffusers teacher folder. Rerunning with the same ``--out`` and settings resumes finished segments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def tiny_teacher(path: Path) -> Path:
    """A random 8×8, 1-channel UNet2DModel + DDPM schedule (the test suite's tiny teacher)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    if (path / "unet" / "config.json").is_file():
        return path
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(4, 8), norm_num_groups=2,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


def teacher_overrides(spec: str, out: Path) -> tuple[list[str], str]:
    """``--set`` overrides selecting the teacher, and a line saying which one it is."""
    from o2mkd_ray.core.teacher import EMBEDDED_TEACHER

    if spec == "embedded":
        if not any((EMBEDDED_TEACHER / sub / "config.json").is_file() for sub in ("unet", "")):
            sys.exit(f"the embedded teacher ({EMBEDDED_TEACHER}) is not there yet; pass --teacher tiny "
                     "(smoke test) or --teacher DIR (a diffusers teacher folder)")
        return ["teacher.pretrained=null"], f"embedded digits teacher ({EMBEDDED_TEACHER})"
    if spec == "tiny":
        d = tiny_teacher(out / "tiny_teacher")
        return ([f"teacher.pretrained={d}", "data.resolution=8", "data.channels=1"],
                "TINY RANDOM TEACHER (8x8, untrained): a smoke test of the benchmark, not evidence for the "
                "claim")
    return [f"teacher.pretrained={spec}"], f"teacher folder {spec}"


def variants(steps: int) -> list[tuple[str, int, int]]:
    """``(name, N, steps per student)``."""
    return [("o2mkd_n3", 3, steps), ("one_to_one_n1", 1, steps), ("o2mkd_n3_equal", 3, max(1, steps // 3))]


def thirds_agreement(run: Path, num_samples: int, seed: int) -> list[float]:
    """ε MSE against the teacher on [0, T/3), [T/3, 2T/3), [2T/3, T), for any number of students."""
    import torch

    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.teacher import eps_of, load_teacher
    from o2mkd_ray.data.build import build_dataset
    from o2mkd_ray.eval.metrics import segment_summary, teacher_agreement
    from o2mkd_ray.pipelines.unconditional import O2MKDPipeline

    cfg = from_dict(json.loads((run / "config.json").read_text()))
    teacher, sched = load_teacher(cfg.teacher)
    multi = O2MKDPipeline.from_pretrained(run / "pipeline").students
    thirds = Segments.uniform(sched.config.num_train_timesteps, 3)  # groups samples; multi still routes
    with torch.no_grad():
        df = teacher_agreement(multi, lambda x, t: (eps_of(teacher(x, t)), None), sched,
                               build_dataset(cfg.data), thirds, num_samples=num_samples, num_buckets=1,
                               seed=seed)
    return segment_summary(df)["mse"].tolist()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "pipelines" / "digits.yaml"))
    p.add_argument("--teacher", default="embedded", help="embedded | tiny | a diffusers teacher folder")
    p.add_argument("--width", type=float, default=0.5, help="student width multiplier (all runs)")
    p.add_argument("--steps", type=int, default=600, help="training steps per student (S)")
    p.add_argument("--out", default="runs/bench_fidelity")
    p.add_argument("--num-images", type=int, default=64, help="generated images per model for fidelity/FID")
    p.add_argument("--eval-steps", type=int, default=20, help="DDIM steps for evaluation")
    p.add_argument("--agreement-samples", type=int, default=512)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every run")
    args = p.parse_args(argv)

    import pandas as pd

    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.engine.session import run_local
    from o2mkd_ray.eval.evaluate import evaluate_run

    out = Path(args.out).expanduser().resolve()
    t_over, t_note = teacher_overrides(args.teacher, out)  # exits before creating OUT when there is none
    out.mkdir(parents=True, exist_ok=True)
    print(f"teacher: {t_note}\nwidth {args.width}, S = {args.steps} steps per student, out {out}", flush=True)
    rows, backend = [], None
    for name, n, steps in variants(args.steps):
        over = [*t_over, *args.overrides, f"name={name}", f"segments.n={n}", "segments.boundaries=null",
                "segments.fractions=null", f"students.width={args.width}", f"train.steps={steps}",
                "mlflow.enabled=false"]
        cfg = load_config(args.config, over)
        print(f"[{name}] distilling: N={n}, {steps} steps per student", flush=True)
        run = run_local(cfg, out / name, progress=False)
        train_s = sum(s["finished_at"] - s["started_at"] for s in run["segments"])  # also right on resume
        rep = evaluate_run(out / name, num_images=args.num_images, steps=args.eval_steps, latency_repeats=3)
        agree = thirds_agreement(out / name, args.agreement_samples, cfg.sampling.seed)
        backend = rep["fid_backend"]
        fid = rep["fid"]
        rows.append({
            "run": name, "N": n, "steps/student": steps, "student steps": n * steps,
            "train_s": round(train_s, 1),
            "agree[0,T/3)": agree[0], "agree[T/3,2T/3)": agree[1], "agree[2T/3,T)": agree[2],
            "agree_all": rep["agreement"]["overall_mse"],
            "traj_mse": rep["trajectory"]["mse_mean"], "traj_psnr_db": rep["trajectory"]["psnr_mean_db"],
            "fid_vs_data": fid["o2mkd_vs_data"]["fid"], "kid_vs_data": fid["o2mkd_vs_data"]["kid"],
            "fid_vs_teacher": fid["o2mkd_vs_teacher"]["fid"],
            "teacher_fid_vs_data": fid["teacher_vs_data"]["fid"], "macs_ratio": rep["cost"]["macs_ratio_run"],
            "params_ratio_total": rep["cost"]["params_ratio_total"],
            "speedup": rep["latency"]["speedup"],
        })
    df = pd.DataFrame(rows)
    fmt = ("display.width", 250, "display.max_columns", 50, "display.float_format", "{:.4g}".format)
    with pd.option_context(*fmt):
        print(f"\nteacher: {t_note}\nFID/KID backend: {backend} (see each run's eval/report.md for why)")
        print("agree* = ε MSE vs teacher (lower is better); traj = same-noise DDIM final images vs teacher; "
              "teacher_fid_vs_data = the teacher's own FID on the same samples\n")
        print(df.to_string(index=False))
    df.to_csv(out / "summary.csv", index=False)
    summary = {"teacher": t_note, "fid_backend": backend, "width": args.width, "steps": args.steps,
               "rows": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {out / 'summary.csv'} and {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
