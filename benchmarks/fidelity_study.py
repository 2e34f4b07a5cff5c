"""The fidelity study of issue 16: a declared grid of distillations (questions x cells x teachers x seeds), run
with the project's own local engine, evaluated, and written up as ``docs/fidelity.md`` with plots.

Each cell+seed is one ``run_local`` run folder (``OUT/TEACHER/QUESTION/CELL/seedK``) and, once evaluated, one line
of ``OUT/results.jsonl``; a rerun skips the lines already there (and ``run_local`` itself resumes a run folder
whose segments were half done), so the grid can be stopped and restarted at any time. The report is always
rebuilt from every line of ``results.jsonl``: mean ± sample std over seeds per cell, and a conclusion per
question generated from those numbers only (which cell wins each comparison, and whether the gap exceeds the
seed spread).

    python benchmarks/fidelity_study.py --only q1_specialisation --teacher digits --seeds 0 1 2
    python benchmarks/fidelity_study.py --report-only --results benchmarks/results/fidelity_study.jsonl
                                                                  # rebuild docs/fidelity.md from the kept rows

The rows behind ``docs/fidelity.md`` are kept in the repository (``benchmarks/results/fidelity_study.jsonl``):
run folders are disposable, the rows are not.

Quality columns reuse ``benchmarks/fidelity.py``: ε MSE against the teacher on each third of [0, T) (whatever N
is) and ``evaluate_run``'s overall agreement, same-noise DDIM trajectory PSNR, and the FID proxy against data and
against teacher samples (the backend ``evaluate_run`` used is named in the report).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fidelity import teacher_overrides, thirds_agreement  # benchmarks/fidelity.py, on the path above
from pydantic import BaseModel, ConfigDict, PositiveInt, ValidationError, model_validator

from o2mkd_ray.core.atomic import write_text
from o2mkd_ray.errors import ConfigError

GRID = ROOT / "benchmarks" / "fidelity_study.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EvalSpec(_Strict):
    """Evaluation sizes for every cell (small on a 2-core CPU; larger where a GPU is available)."""

    num_images: PositiveInt = 32  # generated images per model (trajectory PSNR, FID proxy)
    eval_steps: PositiveInt = 10  # DDIM steps when sampling
    agreement_samples: PositiveInt = 256  # noised data samples for the ε agreement against the teacher
    num_reference: PositiveInt = 500  # dataset images for the FID proxy's reference statistics


class TeacherSpec(_Strict):
    """``spec``: embedded | tiny | a diffusers folder (see fidelity.py); or ``factory`` (``module:function``)
    with ``weights`` (a state dict) and ``mnist_idx`` (MNIST images as IDX .gz, turned into an image folder)."""

    spec: str | None = None
    factory: str | None = None
    weights: str | None = None
    mnist_idx: str | None = None
    overrides: list[str] = []

    @model_validator(mode="after")
    def _one_source(self) -> TeacherSpec:
        if (self.spec is None) == (self.factory is None):
            raise ValueError("give exactly one of spec (embedded | tiny | folder) and factory")
        return self


class Cell(_Strict):
    """One grid cell: N students, steps per student (a list: one budget per segment), width(s), boundaries."""

    name: str
    n: PositiveInt
    steps: PositiveInt | list[PositiveInt]
    width: float | list[float] | None = None  # None: the grid's width
    boundaries: Literal["uniform", "analysis", "snr"] | list[int] = "uniform"
    set: list[str] = []  # extra --set overrides for this cell only

    @model_validator(mode="after")
    def _lengths_match_n(self) -> Cell:
        for key in ("steps", "width"):
            v = getattr(self, key)
            if isinstance(v, list) and len(v) != self.n:
                raise ValueError(f"{key} has {len(v)} entries for n={self.n} segments")
        if isinstance(self.boundaries, list) and len(self.boundaries) != self.n + 1:
            raise ValueError(f"boundaries has {len(self.boundaries)} entries; n={self.n} needs {self.n + 1}")
        return self

    def total_steps(self) -> int:
        return sum(self.steps) if isinstance(self.steps, list) else self.steps * self.n


class Compare(_Strict):
    """Two cells whose difference the conclusion states (``a`` against ``b``)."""

    a: str
    b: str
    label: str


class Question(_Strict):
    title: str
    asks: str
    teachers: list[str]
    cells: list[Cell]
    compare: list[Compare] = []
    notes: str = ""
    # the answer in plain words, written from the generated tables (the report prints it per teacher that ran)
    in_plain_words: dict[str, str] = {}

    @model_validator(mode="after")
    def _known_cells(self) -> Question:
        names = [c.name for c in self.cells]
        if len(set(names)) != len(names):
            raise ValueError(f"cell names repeat: {names}")
        for c in self.compare:
            for side in (c.a, c.b):
                if side not in names:
                    raise ValueError(f"compare names cell {side!r}; the cells are {names}")
        return self


class Grid(_Strict):
    config: str = "pipelines/digits.yaml"  # base config, relative to the repository root
    width: float = 0.5
    seeds: list[int]
    eval: EvalSpec = EvalSpec()
    overrides: list[str] = []  # --set overrides for every run
    teachers: dict[str, TeacherSpec]
    questions: dict[str, Question]

    @model_validator(mode="after")
    def _known_teachers_and_widths(self) -> Grid:
        if len(self.seeds) < 1:
            raise ValueError("seeds: give at least one seed")
        for qname, q in self.questions.items():
            for t in q.teachers:
                if t not in self.teachers:
                    raise ValueError(f"questions.{qname}.teachers names {t!r}; known: {sorted(self.teachers)}")
            for c in q.cells:
                if c.width is None:
                    c.width = self.width
        return self


def load_grid(path: str | Path) -> Grid:
    """The grid YAML as a :class:`Grid`; anything wrong is one ConfigError line naming the key."""
    import yaml

    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"fidelity grid {p}: cannot read it ({str(e).splitlines()[0]})") from None
    try:
        return Grid.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
        raise ConfigError(f"fidelity grid {p}: {loc}: {err['msg']}") from None


def row_key(teacher: str, question: str, cell: str, seed: int) -> str:
    return f"{teacher}/{question}/{cell}/seed{seed}"


def read_results(path: Path) -> list[dict]:
    """Every row of ``results.jsonl`` (a torn last line from a killed writer is ignored)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_result(path: Path, row: dict) -> None:
    """Adds one line atomically (the file is either the old rows or the old rows plus this one), under a lock so
    that several study processes on one machine (say, one per core, on different cells) can share the file."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = path.read_text() if path.is_file() else ""
        if old and not old.endswith("\n"):
            old = old.rsplit("\n", 1)[0] + "\n" if "\n" in old else ""
        write_text(path, old + json.dumps(row, default=str) + "\n")


def snr_boundaries(n: int, scheduler) -> list[int]:
    """Cuts where log-SNR(t) = log(ᾱ/(1-ᾱ)) crosses n equal steps between its ends: every segment spans the
    same log-SNR range (the low-noise end gets fewer timesteps because log-SNR changes fastest there)."""
    import numpy as np

    a = np.asarray(scheduler.alphas_cumprod, dtype=np.float64)
    logsnr = np.log(a / (1 - a))  # decreasing in t
    T = len(a)
    levels = np.linspace(logsnr[0], logsnr[-1], n + 1)[1:-1]
    cuts = [int(np.argmax(logsnr <= lv)) for lv in levels]
    out = [0]
    for c in cuts:
        out.append(min(max(c, out[-1] + 1), T - 1))
    return [*out, T]


def boundary_overrides(cell: Cell, cfg_over: list[str], config: str) -> list[str]:
    """``segments.*`` overrides for the cell's boundaries mode (uniform, analysis, snr or an explicit list)."""
    b = cell.boundaries
    if b == "uniform":
        return [f"segments.n={cell.n}", "segments.boundaries=null", "segments.fractions=null"]
    if isinstance(b, list):
        return [f"segments.boundaries={json.dumps(b)}", "segments.fractions=null"]
    from o2mkd_ray.config.loading import load_config

    cfg = load_config(config, [*cfg_over, f"segments.n={cell.n}", "segments.boundaries=null",
                               "segments.fractions=null"])
    if b == "snr":
        from o2mkd_ray.core.teacher import load_teacher

        cuts = snr_boundaries(cell.n, load_teacher(cfg.teacher)[1])
    else:  # analysis: the proposal `o2mkd-ray analyze` and `tune --seed-from-analysis` use
        from o2mkd_ray.tune.analysis import propose_boundaries

        cuts = propose_boundaries(cfg, cell.n)
    return [f"segments.boundaries={json.dumps([int(c) for c in cuts])}", "segments.fractions=null"]


# ---------------------------------------------------------------------------------------------------------------
# the pretrained MNIST DDPM (a plain CNN, not a diffusers UNet) as a ``teacher.factory``

MNIST_WEIGHTS_ENV = "O2MKD_STUDY_MNIST_DDPM"  # where mnist_ddpm_teacher() finds its state dict


def mnist_ddpm_teacher():
    """``(model, DDPMScheduler)`` for the MNIST DDPM state dict named by ``$O2MKD_STUDY_MNIST_DDPM``.

    The network: four 7x7 conv + LayerNorm(C, 28, 28) + GELU blocks (1->16->32->32->16), a sinusoidal time
    encoding through an MLP added after the first block, a 3x3 conv back to 1 channel. It was trained with time
    ``i / 1000`` for step i in 1..1000 (diffusers timestep k is its step k + 1), on pixels in [-0.5, 0.5], with
    a linear beta schedule stored beside the weights (index 0 unused)."""
    import torch
    from diffusers import DDPMScheduler
    from torch import nn

    path = os.environ.get(MNIST_WEIGHTS_ENV)
    if not path or not Path(path).is_file():
        raise ConfigError(f"mnist_ddpm_teacher: set ${MNIST_WEIGHTS_ENV} to the ddpm_mnist_starter.pth file")
    sd = torch.load(path, map_location="cpu", weights_only=True)

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(cin, cout, 7, padding=3), nn.LayerNorm((cout, 28, 28)), nn.GELU())

        def forward(self, x):
            return self.net(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            chans = [1, 16, 32, 32, 16]
            self.blocks = nn.ModuleList([*(Block(a, b) for a, b in itertools.pairwise(chans)),
                                         nn.Conv2d(16, 1, 3, padding=1)])
            self.time_embed = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                                            nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 16))
            self.register_buffer("frequencies", torch.zeros(16))

        def forward(self, x, t):
            phase = t[:, None] * self.frequencies[None, :]
            h = self.blocks[0](x) + self.time_embed(torch.cat([phase.sin(), phase.cos() - 1], 1))[:, :, None, None]
            for block in self.blocks[1:]:
                h = block(h)
            return h

    class Teacher(nn.Module):
        """Takes diffusers timesteps (0..999) and maps them to the network's time (k + 1) / 1000."""

        def __init__(self):
            super().__init__()
            self.gt = Net()

        def forward(self, x, t, *args, **kwargs):
            t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
            return self.gt(x, (t + 1) / 1000)

    model = Teacher()
    model.load_state_dict({k: v for k, v in sd.items() if k.startswith("gt.")})
    sched = DDPMScheduler(num_train_timesteps=1000, trained_betas=sd["beta_t"][1:].double().numpy().tolist())
    return model, sched


def mnist_images(idx_gz: Path, folder: Path, count: int = 2000) -> Path:
    """The first ``count`` MNIST images of an IDX ``.gz`` as PNGs in ``folder`` (once), for ``image_folder``."""
    import gzip

    import numpy as np
    from PIL import Image

    if len(list(folder.glob("*.png"))) >= count:
        return folder
    raw = gzip.decompress(idx_gz.read_bytes())
    imgs = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i:05d}.png")
    return folder


def mnist_env(t: TeacherSpec, out: Path) -> tuple[dict, list[str], str]:
    """Environment, data overrides and a note for a factory teacher with ``weights`` and ``mnist_idx``."""
    if not t.weights or not Path(t.weights).is_file():
        raise ConfigError(f"fidelity grid: teacher {t.factory} needs weights: a state dict file, got {t.weights!r}")
    data = []
    if t.mnist_idx:
        data = ["data.kind=image_folder", f"data.path={mnist_images(Path(t.mnist_idx), out / 'mnist_png')}"]
    return {MNIST_WEIGHTS_ENV: str(Path(t.weights).resolve())}, data, f"{t.factory} with {t.weights}"


def teacher_setup(grid: Grid, name: str, out: Path) -> tuple[list[str], str]:
    """The ``--set`` overrides selecting teacher ``name`` and a line naming it."""
    t = grid.teachers[name]
    if t.factory:
        env, data, note = mnist_env(t, out / name)
        os.environ.update(env)
        return [f"teacher.factory={t.factory}", "teacher.pretrained=null", *data, *t.overrides], note
    over, note = teacher_overrides(t.spec, out / name)
    return [*over, *t.overrides], note


def run_cell(grid: Grid, teacher: str, qname: str, cell: Cell, seed: int, out: Path, t_over: list[str],
             t_note: str) -> dict:
    """Distils and evaluates one cell+seed; returns its results row."""
    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.engine.session import run_local
    from o2mkd_ray.eval.evaluate import evaluate_run

    ev = grid.eval
    base = [*t_over, *grid.overrides, *cell.set, "mlflow.enabled=false", "eval.enabled=false",
            f"students.width={json.dumps(cell.width)}", f"train.steps={json.dumps(cell.steps)}", f"train.seed={seed}"]
    seg = boundary_overrides(cell, base, str(ROOT / grid.config))
    cfg = load_config(str(ROOT / grid.config), [*base, *seg, f"name={qname}_{cell.name}"])
    folder = out / teacher / qname / cell.name / f"seed{seed}"
    t0 = time.perf_counter()
    run = run_local(cfg, folder, progress=False)
    t1 = time.perf_counter()
    rep = evaluate_run(folder, num_images=ev.num_images, steps=ev.eval_steps,
                       agreement_samples=ev.agreement_samples, num_reference=ev.num_reference,
                       latency_repeats=1)
    thirds = thirds_agreement(folder, ev.agreement_samples, cfg.sampling.seed)
    t2 = time.perf_counter()
    fid = rep["fid"]
    return {
        "key": row_key(teacher, qname, cell.name, seed), "teacher": teacher, "teacher_note": t_note,
        "question": qname, "cell": cell.name, "seed": seed, "n": len(run["segments"]),
        "boundaries": [int(b) for b in cfg.segments.boundaries] if cfg.segments.boundaries else cell.boundaries,
        "width": cell.width, "steps_per_student": cell.steps, "student_steps": cell.total_steps(),
        "agree_t0": thirds[0], "agree_t1": thirds[1], "agree_t2": thirds[2],
        "agree_all": rep["agreement"]["overall_mse"], "traj_psnr_db": rep["trajectory"]["psnr_mean_db"],
        "fid_vs_data": fid["o2mkd_vs_data"]["fid"], "fid_vs_teacher": fid["o2mkd_vs_teacher"]["fid"],
        "teacher_fid_vs_data": fid["teacher_vs_data"]["fid"], "fid_backend": rep["fid_backend"],
        "macs_ratio": rep["cost"]["macs_ratio_run"],
        "train_s": round(sum(s["finished_at"] - s["started_at"] for s in run["segments"]), 2),
        "wall_train_s": round(t1 - t0, 2), "wall_eval_s": round(t2 - t1, 2), "eval_timings_s": rep["timings_s"],
        "eval": ev.model_dump(), "machine": machine(), "command": "python " + shlex.join(sys.argv),
    }


def machine() -> str:
    import torch

    return (f"{platform.node()}: {platform.machine()}, {os.cpu_count()} CPUs visible, torch "
            f"{torch.__version__} with {torch.get_num_threads()} threads, "
            f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}")


def claim(folder: Path) -> bool:
    """Marks run folder ``folder`` as this process's (``FOLDER.claim`` beside it: the engine wants the folder
    itself empty) unless a live other process holds it: several study processes (one per core, same grid) then
    share out the cells without running one twice. A best-effort guard for processes started by hand on one
    machine, not a distributed lock."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    f = folder.parent / f"{folder.name}.claim"
    try:
        pid = int(f.read_text())
        if pid != os.getpid():
            os.kill(pid, 0)  # raises when that process is gone
            return False
    except (OSError, ValueError):
        pass
    write_text(f, str(os.getpid()))
    return True


def cell_signature(grid: Grid, teacher: str, cell: Cell, seed: int) -> str:
    """What decides a cell+seed's result: two cells (in different questions, say the uniform split that several
    questions compare against) with one signature are the same run, so the second reuses the first's row. A list
    of equal widths or budgets is the same run as the single value."""

    def one(v):
        return v[0] if isinstance(v, list) and len(set(v)) == 1 else v

    return json.dumps([teacher, grid.config, grid.overrides, grid.eval.model_dump(), cell.n, one(cell.steps),
                       one(cell.width), cell.boundaries, sorted(cell.set), seed])


def reusable_rows(grid: Grid, rows: list[dict]) -> dict[str, dict]:
    """Signature -> the first fresh (not itself reused) row with it, for the rows whose cell the grid still
    declares as it was run."""
    out: dict[str, dict] = {}
    for r in rows:
        q = grid.questions.get(r["question"])
        cell = next((c for c in q.cells if c.name == r["cell"]), None) if q else None
        if cell is None or r.get("reused_from"):
            continue
        out.setdefault(cell_signature(grid, r["teacher"], cell, r["seed"]), r)
    return out


def run_grid(grid: Grid, out: Path, only: list[str] | None = None, teachers: list[str] | None = None,
             seeds: list[int] | None = None, cells: list[str] | None = None, log=print,
             results: Path | None = None) -> dict:
    """Runs every unfinished cell+seed of the selected part of the grid; returns ``{"ran": k, "skipped": m,
    "reused": r}`` (reused: rows copied from an identical cell+seed of another question, not trained again)."""
    results = results or out / "results.jsonl"
    done = {r["key"] for r in read_results(results)}
    stats = {"ran": 0, "skipped": 0, "reused": 0}
    setups: dict[str, tuple[list[str], str]] = {}
    for qname, q in grid.questions.items():
        if only and qname not in only:
            continue
        for teacher in q.teachers:
            if teachers and teacher not in teachers:
                continue
            for cell in q.cells:
                if cells and cell.name not in cells:
                    continue
                for seed in seeds if seeds is not None else grid.seeds:
                    key = row_key(teacher, qname, cell.name, seed)
                    rows = read_results(results)  # other processes may have added some
                    done |= {r["key"] for r in rows}
                    if key in done:
                        stats["skipped"] += 1
                        continue
                    same = reusable_rows(grid, rows).get(cell_signature(grid, teacher, cell, seed))
                    if same is not None:
                        append_result(results, {**same, "key": key, "question": qname, "cell": cell.name,
                                                "reused_from": same["key"]})
                        stats["reused"] += 1
                        log(f"[{key}] the same run as {same['key']}: its row reused", flush=True)
                        continue
                    if not claim(out / teacher / qname / cell.name / f"seed{seed}"):
                        log(f"[{key}] running in another process; left to it", flush=True)
                        continue
                    if teacher not in setups:
                        setups[teacher] = teacher_setup(grid, teacher, out)
                    log(f"[{key}] N={cell.n}, {cell.steps} steps/student, width {cell.width}", flush=True)
                    row = run_cell(grid, teacher, qname, cell, seed, out, *setups[teacher])
                    append_result(results, row)
                    stats["ran"] += 1
                    log(f"[{key}] agree_all {row['agree_all']:.4g}, psnr {row['traj_psnr_db']:.3g} dB, "
                        f"train {row['wall_train_s']:.0f} s, eval {row['wall_eval_s']:.0f} s", flush=True)
    return stats


# ---------------------------------------------------------------------------------------------------------------
# the report: aggregated only from results.jsonl rows

METRICS = [  # (row key, column header, which direction is better)
    ("agree_t0", "ε MSE [0,T/3)", "low"), ("agree_t1", "ε MSE [T/3,2T/3)", "low"),
    ("agree_t2", "ε MSE [2T/3,T)", "low"), ("agree_all", "ε MSE all", "low"),
    ("traj_psnr_db", "traj PSNR dB", "high"), ("fid_vs_data", "FID vs data", "low"),
    ("fid_vs_teacher", "FID vs teacher", "low"),
]
CONCLUDE = ["agree_all", "agree_t0", "traj_psnr_db", "fid_vs_teacher"]  # the measures a conclusion weighs


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single seed)."""
    import statistics

    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_ms(m: float, s: float | None) -> str:
    return f"{m:.4g} ± {s:.2g}" if s is not None else f"{m:.4g} (1 seed)"


def aggregate(rows: list[dict], teacher: str, qname: str, q: Question) -> list[dict]:
    """Per cell (in grid order) with rows: seeds, N, budgets, and ``(mean, std)`` of every metric."""
    out = []
    for cell in q.cells:
        rs = [r for r in rows if (r["teacher"], r["question"], r["cell"]) == (teacher, qname, cell.name)]
        if not rs:
            continue
        agg = {"cell": cell.name, "n": rs[0]["n"], "steps": rs[0]["steps_per_student"],
               "student_steps": rs[0]["student_steps"], "seeds": sorted(r["seed"] for r in rs),
               "boundaries": rs[0]["boundaries"], "width": rs[0]["width"]}
        for key in [m[0] for m in METRICS] + ["macs_ratio", "wall_train_s", "wall_eval_s"]:
            agg[key] = mean_std([float(r[key]) for r in rs])
        out.append(agg)
    return out


def table(aggs: list[dict]) -> str:
    head = ["cell", "N", "steps/student", "student steps", "width", "boundaries", "seeds", *[m[1] for m in METRICS],
            "MACs/teacher", "train s", "eval s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a in aggs:
        vals = [f"`{a['cell']}`", str(a["n"]), str(a["steps"]), str(a["student_steps"]), str(a["width"]),
                str(a["boundaries"]), str(len(a["seeds"])),
                *[fmt_ms(*a[m[0]]) for m in METRICS], f"{a['macs_ratio'][0]:.3g}",
                f"{a['wall_train_s'][0]:.0f}", f"{a['wall_eval_s'][0]:.0f}"]
        lines.append("| " + " | ".join(vals) + " |")
    return "\n".join(lines)


def compare_line(c: Compare, aggs: dict[str, dict]) -> str:
    """One comparison in words, from the numbers: who is better on each measure and whether the gap between the
    means exceeds the seed spread (the sum of the two standard deviations)."""
    a, b = aggs.get(c.a), aggs.get(c.b)
    if a is None or b is None:
        return f"- **{c.label}** (`{c.a}` vs `{c.b}`): not both run yet."
    parts, wins = [], {c.a: 0, c.b: 0}
    for key in CONCLUDE:
        header, better = next((m[1], m[2]) for m in METRICS if m[0] == key)
        (ma, sa), (mb, sb) = a[key], b[key]
        winner = c.a if (ma < mb) == (better == "low") else c.b
        gap = abs(ma - mb)
        if sa is None or sb is None:
            verdict = "one seed, no spread to judge by"
        elif gap > sa + sb:
            verdict, wins[winner] = f"gap {gap:.2g} > spread {sa + sb:.2g}: clear", wins[winner] + 1
        else:
            verdict = f"gap {gap:.2g} ≤ spread {sa + sb:.2g}: within seed noise"
        parts.append(f"{header}: `{winner}` better (`{c.a}` {ma:.4g} vs `{c.b}` {mb:.4g}; {verdict})")
    tally = (f"`{c.a}` wins {wins[c.a]} and `{c.b}` wins {wins[c.b]} of {len(CONCLUDE)} measures beyond the "
             f"seed spread")
    def budget(x: dict) -> str:  # "3 × 300 = 900", or per-segment budgets "[500, 200, 200] = 900"
        return (f"{x['steps']} = {x['student_steps']}" if isinstance(x["steps"], list)
                else f"{x['n']} × {x['steps']} = {x['student_steps']}")

    return (f"- **{c.label}** — `{c.a}` ({budget(a)} student steps) vs `{c.b}` ({budget(b)}): "
            + "; ".join(parts) + f". {tally}.")


def hardest_third(aggs: list[dict]) -> str:
    names = {"agree_t0": "[0,T/3)", "agree_t1": "[T/3,2T/3)", "agree_t2": "[2T/3,T)"}
    hardest = [max(names, key=lambda k: a[k][0]) for a in aggs]
    counts = {names[k]: hardest.count(k) for k in names if hardest.count(k)}
    return ("- Hardest third (highest mean ε MSE against the teacher), cells per third: "
            + ", ".join(f"{k}: {v} of {len(aggs)}" for k, v in counts.items()) + ".")


def plot(aggs: list[dict], path: Path, title: str) -> Path:
    """Quality against total student steps, one line per N, error bars = seed std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key in zip(axes, ["agree_all", "agree_t0", "traj_psnr_db"]):
        for n in sorted({a["n"] for a in aggs}):
            pts = sorted((a["student_steps"], *a[key]) for a in aggs if a["n"] == n)
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] or 0 for p in pts], marker="o",
                        capsize=3, label=f"N={n}")
        ax.set_xlabel("student steps in all")
        ax.set_ylabel(next(m[1] for m in METRICS if m[0] == key))
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def not_run(qname: str, q: Question, teacher: str, done: set[str]) -> str:
    todo = [c for c in q.cells if c.name not in done]
    if not todo:
        return ""
    lines = ["| cell | N | steps/student | width | boundaries |", "|---|---|---|---|---|"]
    for c in todo:
        lines.append(f"| `{c.name}` | {c.n} | {c.steps} | {c.width} | {c.boundaries} |")
    cmd = f"python benchmarks/fidelity_study.py --only {qname} --teacher {teacher}"
    head = "**Not run yet.**" if len(todo) == len(q.cells) else "Cells not run yet:"
    if len(todo) < len(q.cells):
        cmd += " --cells " + " ".join(c.name for c in todo)
    return f"{head} Command: `{cmd}`\n\n" + "\n".join(lines) + "\n"


def question_section(rows: list[dict], qname: str, q: Question, teacher: str, plots: Path) -> list[str]:
    aggs = aggregate(rows, teacher, qname, q)
    out = [f"### Teacher `{teacher}`", ""]
    if aggs:
        rs = [r for r in rows if (r["teacher"], r["question"]) == (teacher, qname)]
        cmds = sorted({r["command"] for r in rs})
        fresh = [r for r in rs if not r.get("reused_from")]
        reused = sorted({r["reused_from"].split("/seed")[0] for r in rs if r.get("reused_from")})
        out += [f"Teacher: {rs[0]['teacher_note']}. FID proxy backend: {sorted({r['fid_backend'] for r in rs})}.",
                f"Runs: {len(fresh)}" + (f" (and {len(rs) - len(fresh)} rows reused from the identical cells "
                                         + ", ".join(f"`{x}`" for x in reused) + ")" if reused else "")
                + f"; wall time: {sum(r['wall_train_s'] for r in fresh):.0f} s training + "
                f"{sum(r['wall_eval_s'] for r in fresh):.0f} s evaluation. Command(s): "
                + ", ".join(f"`{c}`" for c in cmds) + ".", "", table(aggs), ""]
        png = plot(aggs, plots / f"fidelity_{qname}_{teacher}.png", f"{qname} — {teacher}")
        out += [f"![{qname} {teacher}]({png.name})", "", "Conclusion (generated from the table above):", ""]
        by_name = {a["cell"]: a for a in aggs}
        out += [compare_line(c, by_name) for c in q.compare] + [hardest_third(aggs), ""]
        if teacher in q.in_plain_words:
            out += [f"**In plain words** (written from this table): {q.in_plain_words[teacher].strip()}", ""]
    out += [not_run(qname, q, teacher, {a["cell"] for a in aggs})]
    return out


def write_report(grid: Grid, rows: list[dict], doc: Path, plots: Path, grid_path: str) -> list[Path]:
    """``docs/fidelity.md`` (and its plots) from the result rows; returns the written files."""
    machines = sorted({r["machine"] for r in rows})
    lines = ["# Fidelity study (issue 16)", "",
             (f"Generated by `benchmarks/fidelity_study.py` from its result rows (kept in "
             f"`benchmarks/results/fidelity_study.jsonl`) and the grid `{Path(grid_path).name}`; do not edit by "
             "hand: `python benchmarks/fidelity_study.py --report-only --results "
             "benchmarks/results/fidelity_study.jsonl` rebuilds it."), "",
             ("Each cell is mean ± sample standard deviation over seeds (training seed `train.seed`; evaluation "
             "noise fixed). ε MSE = the students' noise prediction against the teacher's on noised data, per "
             "third of [0, T) whatever N is (lower is better); traj PSNR = DDIM final images from the same "
             "noise against the teacher's (higher is better); FID vs data / vs teacher = the FID proxy of "
             "`evaluate_run` (its backend is named per teacher; lower is better). A conclusion calls a gap "
             "*clear* only when it exceeds the sum of the two cells' standard deviations."), "",
             f"Evaluation sizes: {grid.eval.model_dump()}.", "",
             "Machine(s): " + ("; ".join(machines) if machines else "none yet") + ".", ""]
    for qname, q in grid.questions.items():
        lines += [f"## `{qname}`: {q.title}", "", q.asks, ""] + ([q.notes, ""] if q.notes else [])
        for teacher in q.teachers:
            lines += question_section(rows, qname, q, teacher, plots)
    write_text(doc, "\n".join(lines).rstrip() + "\n")
    return [doc, *sorted(plots.glob("fidelity_*.png"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default=str(GRID), help="the grid YAML")
    p.add_argument("--out", default="runs/fidelity_study", help="run folders and results.jsonl")
    p.add_argument("--only", nargs="+", metavar="QUESTION", help="run only these questions")
    p.add_argument("--teacher", nargs="+", metavar="NAME", help="run only these teachers")
    p.add_argument("--seeds", nargs="+", type=int, help="run only these seeds (default: the grid's)")
    p.add_argument("--cells", nargs="+", metavar="CELL", help="run only these cells (e.g. one process per core)")
    p.add_argument("--doc", default=str(ROOT / "docs" / "fidelity.md"))
    p.add_argument("--plots", default=str(ROOT / "docs"), help="folder of the fidelity_*.png plots")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (evaluation too)")
    p.add_argument("--results", default=None,
                   help="the results rows (default OUT/results.jsonl); benchmarks/results/fidelity_study.jsonl "
                        "holds the rows behind docs/fidelity.md")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from results.jsonl only")
    args = p.parse_args(argv)

    grid = load_grid(args.grid)  # a bad grid is one line before anything runs
    import torch

    torch.set_num_threads(args.threads)
    for name, known in (("--only", grid.questions), ("--teacher", grid.teachers)):
        bad = [v for v in (getattr(args, name[2:]) or []) if v not in known]
        if bad:
            sys.exit(f"{name}: unknown {bad}; the grid has {sorted(known)}")
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = Path(args.results).expanduser().resolve() if args.results else out / "results.jsonl"
    t0 = time.perf_counter()
    if not args.report_only:
        stats = run_grid(grid, out, args.only, args.teacher, args.seeds, args.cells, results=results)
        print(f"ran {stats['ran']}, reused {stats['reused']}, skipped {stats['skipped']} already in "
              f"{results} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    rows = read_results(results)
    written = write_report(grid, rows, Path(args.doc), Path(args.plots), args.grid)
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
