"""Teacher agreement of distilled vs untrained students on tiny text-to-image teachers (SD 1.x-style ε, SD 2.x-style
v-prediction, SDXL, SD3's flow-matching MMDiT), through the local engine: does a short run teach the students the
teacher's outputs under its captions?

    .venv/bin/python benchmarks/t2i_agreement.py [--steps 60] [--kinds sd sd-v sdxl sd3]

For each kind: a tiny random teacher folder built locally, students built as distill builds them (UNets:
teacher-slice init, width 0.5, one ResNet pair per block, no mid block; SD3: pipelines/sd3_tiny.yaml's half-depth,
half-head transformers, flow-matching training) and scored before training, then the same config distilled for
``--steps`` steps and scored again. Agreement = the tune objective ``agreement``: student-vs-teacher
output MSE over timesteps on the run's cached caption latents, each with its own caption's conditioning. The teacher
is random: this shows the machinery learns the teacher, not image quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red square", "a blue circle on grass", "two cats", "a city at night", "a bowl of fruit",
           "a green car", "snow on a mountain", "a yellow flower", "an old book", "a boat at sea",
           "a cup of coffee", "a dog running"]


def _overrides(folder: Path, prompts: Path, steps: int) -> list[str]:
    return [f"teacher.pretrained={folder}", "data.kind=prompts", f"data.path={prompts}", "data.synth_steps=3",
            "segments.boundaries=[0,500,1000]", "students.width=0.5", "students.layers_per_block=1", "students.drop_mid_block=true",
            "train.batch_size=8", f"train.steps={steps}", f"train.checkpoint_every={max(1, steps // 2)}",
            "train.lr=0.001", "sampling.steps=3", "sampling.num_images=2", "mlflow.enabled=false",
            "eval.enabled=false"]


def _sd3_overrides(folder: Path, prompts: Path, steps: int) -> list[str]:
    return [f"teacher.pretrained={folder}", f"data.path={prompts}", "data.synth_steps=3",
            "segments.boundaries=[0,500,1000]", "train.batch_size=8", f"train.steps={steps}",
            f"train.checkpoint_every={max(1, steps // 2)}", "train.lr=0.001", "sampling.steps=3",
            "sampling.num_images=2", "mlflow.enabled=false", "eval.enabled=false"]


def measure(kind: str, steps: int, root: Path) -> dict:
    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.core.fixtures import make_tiny_sd, make_tiny_sd3, make_tiny_sdxl
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.engine.session import run_local
    from o2mkd_ray.pipelines.build import build_sd_pipeline, teacher_sd_pipeline
    from o2mkd_ray.tune.trial import objective_value

    makers = {"sd": make_tiny_sd, "sd-v": partial(make_tiny_sd, prediction_type="v_prediction"),
              "sdxl": make_tiny_sdxl, "sd3": make_tiny_sd3}
    folder = root / kind / "teacher"
    makers[kind](folder)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    if kind == "sd3":
        cfg = load_config(ROOT / "pipelines" / "sd3_tiny.yaml", _sd3_overrides(folder, prompts, steps))
    else:
        cfg = load_config(ROOT / "pipelines" / "tiny.yaml", _overrides(folder, prompts, steps))
    teacher, sched = load_teacher(cfg.teacher)
    untrained = root / kind / "untrained"
    students = build_students(cfg, teacher, cfg.segments.n)
    build_sd_pipeline(students, cfg.segments.boundaries, teacher_sd_pipeline(cfg, teacher),
                      cfg.sampling.scheduler).save_pretrained(untrained / "pipeline")
    (untrained / "config.json").write_text(cfg.to_json())
    before = objective_value(cfg, untrained, "agreement", teacher, sched, samples=256)["quality"]
    t0 = time.perf_counter()
    run_local(cfg, root / kind / "trained", progress=False)
    wall = time.perf_counter() - t0
    after = objective_value(cfg, root / kind / "trained", "agreement", teacher, sched, samples=256)["quality"]
    return {"kind": kind, "steps": steps, "untrained": before, "trained": after, "gain": before / after,
            "distill_wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--kinds", nargs="+", default=["sd", "sd-v", "sdxl", "sd3"])
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds:
            rows.append(measure(kind, args.steps, Path(tmp)))
            r = rows[-1]
            print(f"{kind:5s} steps {r['steps']:4d}  agreement untrained {r['untrained']:.5f}  trained "
                  f"{r['trained']:.5f}  gain {r['gain']:.1f}x  distill {r['distill_wall_s']:.1f} s", flush=True)
    print("\n| teacher | steps | agreement MSE, untrained | trained | gain | distill wall (s) |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['steps']} | {r['untrained']:.5f} | {r['trained']:.5f} | {r['gain']:.1f}x | "
              f"{r['distill_wall_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
