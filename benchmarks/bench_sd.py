"""Text-to-image sampling cost: a (tiny) Stable Diffusion teacher against O2MKD students, side by side in one run.

For each student variant (N students of one architecture, one per uniform timestep segment, initialised from the
teacher as a distill run does) it measures, against the teacher, with the same prompts, noise, scheduler (DDIM),
steps and classifier-free guidance (two UNet branches per step):

  macs_ratio     UNet MACs per step, student / teacher (``count_macs``, batch 1, the tokenizer's text length)
  unet_speedup   teacher / students wall time of the denoising loop alone (``output_type="latent"``)
  e2e_speedup    teacher / students wall time of whole pipeline calls (text encoder + loop + VAE decode)
  efficiency     unet_speedup x macs_ratio (1 = wall time falls as fast as MACs)

Each repetition times every pipeline once in rotated order (interleaved) after a warm-up; medians are reported.
``--run OUT`` adds the students of a finished text-to-image distill run (``OUT/pipeline``) against their own
teacher. Sizes: ``tiny`` is the test folder of ``o2mkd_ray.core.fixtures.make_tiny_sd`` (0.28 M UNet parameters);
``small`` the same layout at 3 stages x (64, 128, 256) channels, 32x32 latents (UNet compute dominates).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sd.py --size small            # 20 steps, batch 4
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_sd.py --size tiny --run runs/sd_tiny
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {
    "tiny": dict(sample_size=8, block_out_channels=(16, 32), cross_attention_dim=16),
    "small": dict(sample_size=32, block_out_channels=(64, 128, 256), cross_attention_dim=64),
}
# (label, build_student kwargs)
VARIANTS = [
    ("width 0.5", dict(width=0.5)),
    ("BK-SDM base (1 layer/block)", dict(width=1.0, layers_per_block=1)),
    ("BK-SDM small (+ no mid block)", dict(width=1.0, layers_per_block=1, drop_mid_block=True)),
    ("width 0.5 + BK-SDM small", dict(width=0.5, layers_per_block=1, drop_mid_block=True)),
]
PROMPTS = ["a red bus on a street", "two dogs in the snow", "a bowl of fruit", "a man riding a horse",
           "a kitchen with a window", "a plate of food", "a giraffe by a tree", "a boat on a lake"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="prompts per call (default 4)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--n", type=int, default=3, help="students per variant (default 3)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--run", default=None, help="also time OUT/pipeline of a text-to-image distill run")
    p.add_argument("--json", default=None, help="write the table as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    import pandas as pd
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    from o2mkd_ray.core.costs import count_macs, count_params
    from o2mkd_ray.core.fixtures import make_tiny_sd
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.students import build_student
    from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet
    from o2mkd_ray.pipelines.stable_diffusion import O2MKDStableDiffusionPipeline

    args = parse_args(argv)
    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    torch.manual_seed(0)
    prompts = (PROMPTS * args.batch)[:args.batch]

    def macs(unet, seq_len):
        c = unet.config
        return count_macs(unet, (1, c.in_channels, c.sample_size, c.sample_size), seq_len=seq_len)

    def ddim(pipe):
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipes: dict[str, object] = {}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = ddim(make_tiny_sd(Path(tmp) / "sd", **SIZES[args.size]))
        L = teacher.tokenizer.model_max_length
        t_macs = macs(teacher.unet, L)
        pipes["teacher"] = teacher
        rows.append({"pipeline": "teacher", "params": count_params(teacher.unet), "macs_per_step": t_macs})
        bounds = Segments.uniform(teacher.scheduler.config.num_train_timesteps, args.n).boundaries
        for label, kw in VARIANTS:
            students = [build_student(teacher.unet, **kw) for _ in range(args.n)]
            multi = MultiStudentUNet(students, boundaries=list(bounds)).eval()
            pipes[label] = ddim(O2MKDStableDiffusionPipeline.from_teacher(teacher, multi))
            rows.append({"pipeline": label, "params": count_params(students[0]), "macs_per_step": macs(students[0], L)})
        if args.run:
            run = Path(args.run)
            cfg = json.loads((run / "config.json").read_text())
            own = ddim(StableDiffusionPipeline.from_pretrained(cfg["teacher"]["pretrained"], safety_checker=None,
                                                               requires_safety_checker=False))
            pipes["run teacher"] = own
            rows.append({"pipeline": "run teacher", "params": count_params(own.unet),
                         "macs_per_step": macs(own.unet, own.tokenizer.model_max_length)})
            mine = ddim(O2MKDStableDiffusionPipeline.from_pretrained(run / "pipeline"))
            pipes[f"run students ({run.name})"] = mine
            st = mine.unet
            rows.append({"pipeline": f"run students ({run.name})", "params": count_params(st) // st.num_students,
                         "macs_per_step": sum(macs(st.student(k), own.tokenizer.model_max_length)
                                              for k in range(st.num_students)) / st.num_students})

        def call(pipe, latent: bool):
            g = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            t0 = time.perf_counter()
            pipe(prompts, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=g,
                 output_type="latent" if latent else "np")
            return time.perf_counter() - t0

        names = list(pipes)
        for name in names:  # warm-up
            call(pipes[name], True)
        times = {(n, m): [] for n in names for m in (True, False)}
        for r in range(args.reps):
            order = names[r % len(names):] + names[:r % len(names)]
            for latent in (True, False):
                for name in order:
                    times[name, latent].append(call(pipes[name], latent))

    df = pd.DataFrame(rows).set_index("pipeline")
    df["unet_loop_s"] = [statistics.median(times[n, True]) for n in df.index]
    df["e2e_s"] = [statistics.median(times[n, False]) for n in df.index]
    base = {n: ("run teacher" if n.startswith("run students") else "teacher") for n in df.index}
    df["macs_ratio"] = [df.loc[n, "macs_per_step"] / df.loc[base[n], "macs_per_step"] for n in df.index]
    df["unet_speedup"] = [df.loc[base[n], "unet_loop_s"] / df.loc[n, "unet_loop_s"] for n in df.index]
    df["e2e_speedup"] = [df.loc[base[n], "e2e_s"] / df.loc[n, "e2e_s"] for n in df.index]
    df["efficiency"] = df["unet_speedup"] * df["macs_ratio"]
    print(f"size={args.size} steps={args.steps} batch={args.batch} guidance={args.guidance} reps={args.reps} "
          f"N={args.n} torch_threads={torch.get_num_threads()}")
    print(df.to_markdown(floatfmt=".4g"))
    if args.json:
        Path(args.json).write_text(df.reset_index().to_json(orient="records", indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
