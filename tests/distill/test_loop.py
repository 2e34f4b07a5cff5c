"""The one training loop (both engines run it), the one EMA, and checkpoints: atomic writes with a manifest, the
round trip, truncated or foreign checkpoints, the fall-back on resume (plain torch, no Ray cluster)."""

from __future__ import annotations

import ast
import contextlib
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT

TINY = ROOT / "pipelines" / "tiny.yaml"
PKG = ROOT / "o2mkd_ray"


def _cfg(overrides, *extra):
    from o2mkd_ray.config.loading import load_config

    return load_config(TINY, [*overrides, *extra])


def _distiller(cfg, k: int = 0):
    """A SegmentDistiller for segment k on the tiny teacher, built as the local engine builds it."""
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import TeacherFn, load_teacher, sample_shape
    from o2mkd_ray.distill.distiller import SegmentDistiller

    teacher, scheduler = load_teacher(cfg.teacher)
    shape = sample_shape(teacher, cfg.data.channels, cfg.data.resolution)
    segments = Segments.from_config(cfg.segments, scheduler.config.num_train_timesteps)
    fn = TeacherFn(teacher, cfg.kd.feature_blocks)
    channels = fn.feature_channels(shape) if cfg.kd.lambda_feat > 0 else {}
    student = build_students(cfg, teacher, segments.n)[k]
    return SegmentDistiller(cfg, k, segments, scheduler, student, channels), fn


def _step(dist, fn, x_0) -> dict:
    x_t, t, eps = dist.make_inputs(x_0)
    eps_T, feats_T = fn(x_t, t, features=bool(dist.blocks))
    return dist.train_step(x_t, t, eps, eps_T, feats_T)


def _train(dist, fn, steps: int) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        _step(dist, fn, torch.rand((4, *dist.shape), generator=g) * 2 - 1)


def _params(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


# ----------------------------------------------------------------------------------------------------------------
# one loop for both engines


def _calls(path: Path, attr: str | None = None, name: str | None = None) -> int:
    n = 0
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            n += (attr is not None and isinstance(f, ast.Attribute) and f.attr == attr) or \
                 (name is not None and isinstance(f, ast.Name) and f.id == name)
    return n


def test_the_loop_is_the_only_caller_of_train_step_and_both_engines_call_it():
    callers = {str(p.relative_to(ROOT)): c for p in PKG.rglob("*.py") if (c := _calls(p, attr="train_step"))}
    assert callers == {"o2mkd_ray/distill/loop.py": 1}, callers
    # the Ray worker and the local engine's segment runner both hand their distiller to loop.run
    assert _calls(PKG / "engine" / "train_loop.py", name="run") == 1
    tree = ast.parse((PKG / "distill" / "loop.py").read_text())
    run_segment = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "run_segment")
    assert any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run" for n in ast.walk(run_segment))
    assert "run_segment" in (PKG / "distill" / "local.py").read_text()


def _ray_worker_history(cfg, k: int, monkeypatch) -> tuple[dict, list]:
    """``train_loop_per_worker`` of segment k in this process: the driver's loop config, Ray Train's calls stubbed
    (rank 0 of 1, CPU, no checkpoint to resume, ``report`` recorded), object-store references passed as values."""
    import ray
    import ray.train
    import ray.train.torch

    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.teacher import TeacherFn, load_teacher, sample_shape
    from o2mkd_ray.distill.checkpoints import verify_checkpoint
    from o2mkd_ray.engine.train_loop import train_loop_per_worker
    from o2mkd_ray.engine.trainers import loop_configs, student_inits

    reports = []
    monkeypatch.setattr(ray, "put", lambda v: v)
    monkeypatch.setattr(ray, "get", lambda v: v)
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0,
                                                                          get_world_size=lambda: 1))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train, "report", lambda m, checkpoint=None: reports.append(
        (m["step"], verify_checkpoint(checkpoint.path, cfg)["step"])))  # rank 0 reports with its checkpoint
    teacher, scheduler = load_teacher(cfg.teacher)
    segments = Segments.from_config(cfg.segments, scheduler.config.num_train_timesteps)
    channels = TeacherFn(teacher, cfg.kd.feature_blocks).feature_channels(
        sample_shape(teacher, cfg.data.channels, cfg.data.resolution))
    config = loop_configs(cfg, segments, scheduler, [k], student_inits(cfg, teacher, segments.n), [], channels)[k]
    return train_loop_per_worker(config), reports


def test_local_engine_and_ray_worker_report_the_same_metrics(tiny_overrides, tmp_path, monkeypatch):
    """Same seed, same tiny teacher: the local engine and the Ray worker function (run in-process) train segment 1
    to the same numbers, report at the same steps with the same keys, and write the same summary fields."""
    from o2mkd_ray.distill.local import train_local

    cfg = _cfg(tiny_overrides, "segments.n=2", "teacher.mode=local", "train.steps=4", "train.checkpoint_every=2")
    train_local(cfg, tmp_path / "run", progress=False)
    local = json.loads((tmp_path / "run" / "segments" / "seg-01" / "summary.json").read_text())
    ray_run, reports = _ray_worker_history(cfg, 1, monkeypatch)

    assert [m["step"] for m in local["history"]] == [m["step"] for m in ray_run["history"]] == [2, 4]
    assert reports == [(2, 2), (4, 4)]
    # wall-clock figures: present in both, not equal
    timing = {"time", "samples_per_s", "teacher_latency_ms", "teacher_wait_share"}
    for a, b in zip(local["history"], ray_run["history"]):
        assert set(a) == set(b) and timing <= set(a)
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert ray_run["segment"] == 1 and ray_run["resumed_from"] == local["resumed_from"] == 0
    for key in ("index", "boundaries", "started_at", "finished_at", "steps", "resumed_from", "final_loss",
                "val_loss", "samples_per_s", "checkpoint", "history"):
        assert key in local, key
    assert local["steps"] == 4 and local["final_loss"] == ray_run["history"][-1]["loss_avg"]


def test_per_segment_step_budgets(tiny_overrides, tmp_path, capsys):
    """train.steps = [6, 2]: each segment trains, reports and checkpoints up to its own budget, and its learning
    rate decays to 10 % at its own last step (the cosine spans the segment's budget, not the run's)."""
    from o2mkd_ray.distill.local import train_local
    from o2mkd_ray.engine.console import ConsoleProgress
    from o2mkd_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^train\.steps: got 3 budgets for 2 segments; give one number or 2$"):
        _cfg(tiny_overrides, "segments.n=2", "train.steps=[6, 2, 2]")
    cfg = _cfg(tiny_overrides, "segments.n=2", "teacher.mode=local", "train.steps=[6, 2]",
               "train.checkpoint_every=2", "train.warmup_steps=0", "train.lr=0.01")
    train_local(cfg, tmp_path / "run", progress=False)
    for k, budget in ((0, 6), (1, 2)):
        seg = json.loads((tmp_path / "run" / "segments" / f"seg-{k:02d}" / "summary.json").read_text())
        assert seg["steps"] == budget and [m["step"] for m in seg["history"]] == list(range(2, budget + 1, 2))
        ckpts = sorted(p.name for p in (tmp_path / "run" / "local" / f"seg-{k:02d}").glob("checkpoint_*"))
        assert ckpts[-1] == f"checkpoint_{budget:06d}", ckpts
        dist, _ = _distiller(cfg, k)
        for _ in range(budget):
            dist.opt.step()
            dist.lr_sched.step()
        assert dist.lr_sched.get_last_lr()[0] == pytest.approx(0.001)  # 10 % of 0.01 at its own budget
    ConsoleProgress([6, 2], bars=False)(1, {"step": 2, "loss_avg": 0.5, "time": 1.0})
    assert "[seg-01] finished: 2 steps" in capsys.readouterr().out


def test_local_engine_resumes_from_its_newest_usable_checkpoint(tiny_overrides, tmp_path):
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import LocalTeacher
    from o2mkd_ray.data.build import build_dataset
    from o2mkd_ray.distill.loop import run_segment

    cfg = _cfg(tiny_overrides, "segments.n=2", "kd.lambda_feat=0", "train.checkpoint_every=2")
    dist, fn = _distiller(cfg)  # its segments, scheduler and teacher
    dataset, ckdir = build_dataset(cfg.data), tmp_path / "local" / "seg-00"

    def segment(steps: int) -> dict:
        cfg.train.steps = steps  # not part of what a checkpoint means: the same run, a longer budget
        student = build_students(cfg, fn.model, 2)[0]
        return run_segment(cfg, 0, dist.segments, dist.scheduler, student, LocalTeacher(fn), {}, dataset,
                           ckpt_dir=ckdir)

    segment(4)  # a run stopped after step 4 (checkpoints 2 and 4)
    w = ckdir / "checkpoint_000004" / "train_state.pt"
    w.write_bytes(w.read_bytes()[:50])  # ... and its newest checkpoint is truncated
    with pytest.warns(UserWarning, match="earlier checkpoint checkpoint_000002"):
        res = segment(6)
    assert res["resumed_from"] == 2 and [m["step"] for m in res["history"]] == [4, 6]
    assert all(m["resumed_from"] == 2 for m in res["history"])


def test_local_engine_keeps_the_checkpoint_train_select_names(tmp_path):
    from o2mkd_ray.distill.local import choose_checkpoint

    for step, val in ((2, 0.5), (4, 0.2), (6, 0.3)):
        d = tmp_path / f"checkpoint_{step:06d}"
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"metrics": {"step": step, "val_loss": val}}))
    assert choose_checkpoint("final", tmp_path, [])[0].name == "checkpoint_000006"
    best, metrics = choose_checkpoint("best", tmp_path, [])
    assert best.name == "checkpoint_000004" and metrics["val_loss"] == 0.2


# ----------------------------------------------------------------------------------------------------------------
# the one EMA


def test_ema_follows_the_student_on_diffusers_schedule(tiny_overrides):
    """Update 1 copies the student (diffusers' EMAModel warm-up); update 2 is ``d·θ1 + (1-d)·θ2`` with
    ``d = min(ema_decay, 2/11)``; the EMA then differs from the student."""
    cfg = _cfg(tiny_overrides)
    dist, fn = _distiller(cfg)
    _train(dist, fn, 1)
    theta1 = _params(dist.student)
    assert all(torch.equal(e, s) for e, s in zip(_params(dist.ema), theta1))
    _train(dist, fn, 1)
    theta2 = _params(dist.student)
    d = min(cfg.train.ema_decay, 2 / 11)
    assert dist.ema_weights.decay == pytest.approx(d)
    want = [d * a + (1 - d) * b for a, b in zip(theta1, theta2)]
    got = _params(dist.ema)
    assert all(torch.allclose(g, w, rtol=0, atol=1e-6) for g, w in zip(got, want))
    assert any(not torch.allclose(g, s) for g, s in zip(got, theta2)), "the EMA equals the student"
    assert not any(p.requires_grad for p in dist.ema.parameters())
    # the averager updates the EMA model's own tensors: no second copy of the student
    shadow = dist.ema_weights.averager.shadow_params
    assert [t.data_ptr() for t in shadow] == [p.data_ptr() for p in dist.ema.parameters()]


def test_every_ema_in_the_package_is_the_one_ema_class():
    """Outside config validation, ``train.ema_decay`` (students) and the teacher trainer's ``ema_decay`` only ever
    reach ``EMA(...)``."""
    uses = []
    for p in PKG.rglob("*.py"):
        if p.parent.name == "config":
            continue
        tree = ast.parse(p.read_text())
        parents = {c: n for n in ast.walk(tree) for c in ast.iter_child_nodes(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "ema_decay" and isinstance(node.ctx, ast.Load):
                call = parents.get(node)
                uses.append((p.name, getattr(getattr(call, "func", None), "id", None)))
    assert sorted(uses) == [("distiller.py", "EMA"), ("teacher_train.py", "EMA")], uses


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


@pytest.fixture
def ckpts(tiny_overrides, tmp_path):
    """Checkpoints at steps 2 and 4 of one distiller, in sibling folders as Ray keeps them."""
    cfg = _cfg(tiny_overrides)
    dist, fn = _distiller(cfg)
    _train(dist, fn, 2)
    c2 = dist.save(tmp_path / "seg-00" / "checkpoint_000002")
    _train(dist, fn, 2)
    c4 = dist.save(tmp_path / "seg-00" / "checkpoint_000004")
    return cfg, dist, fn, c2, c4


def test_checkpoint_round_trip_continues_identically(ckpts):
    """Load into a fresh distiller: the next step gives the same loss terms and the same student and EMA."""
    from diffusers import UNet2DModel

    cfg, dist, fn, _, c4 = ckpts
    fresh, _ = _distiller(cfg)
    fresh.load(c4)
    assert fresh.ema_weights.state_dict() == dist.ema_weights.state_dict()
    ema4 = _params(dist.ema)
    x_0 = torch.rand((4, *dist.shape), generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert _step(fresh, fn, x_0) == _step(dist, fn, x_0)
    for a, b in ((fresh.student, dist.student), (fresh.ema, dist.ema)):
        assert all(torch.equal(x, y) for x, y in zip(_params(a), _params(b)))
    # the EMA folder is a plain UNet folder (OUT/segments/seg-KK/ema and pipeline/ are built from it)
    ema_cfg, student_cfg = (json.loads((c4 / f / "config.json").read_text()) for f in ("ema", "student"))
    assert ema_cfg == student_cfg
    loaded = UNet2DModel.from_pretrained(c4 / "ema")
    assert all(torch.equal(x, y) for x, y in zip(_params(loaded), ema4))


def test_checkpoint_without_ema_state_counts_updates_from_its_step(ckpts):
    """A checkpoint written before the EMA state was saved resumes the EMA schedule at its training step."""
    from o2mkd_ray.distill.checkpoints import MANIFEST, TRAIN_STATE, hash_files

    cfg, _, _, _, c4 = ckpts
    state = torch.load(c4 / TRAIN_STATE, weights_only=True)
    del state["ema"]
    torch.save(state, c4 / TRAIN_STATE)
    manifest = json.loads((c4 / MANIFEST).read_text())
    (c4 / MANIFEST).write_text(json.dumps({**manifest, "files": hash_files(c4)}))
    fresh, _ = _distiller(cfg)
    fresh.load(c4)
    assert fresh.ema_weights.state_dict()["optimization_step"] == 4


def test_save_is_atomic_with_a_manifest(ckpts):
    from o2mkd_ray.distill.checkpoints import MANIFEST, config_hash, verify_checkpoint

    cfg, dist, _, c2, c4 = ckpts
    m = json.loads((c4 / MANIFEST).read_text())
    assert m["step"] == 4 and m["segment"] == 0 and m["boundaries"] == list(dist.segments.boundaries)
    assert m["config_hash"] == config_hash(cfg)
    files = {str(p.relative_to(c4)) for p in c4.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(m["files"]) == files and "train_state.pt" in files
    assert not list(c4.parent.glob("*.tmp-*")), "a temp folder was left behind"
    assert verify_checkpoint(c4, cfg)["step"] == 4
    dist.save(c4)  # overwriting an existing checkpoint folder is atomic as well
    assert verify_checkpoint(c4, cfg)["step"] == 4


@pytest.mark.parametrize("victim", ["student/diffusion_pytorch_model.safetensors", "ema/config.json",
                                    "train_state.pt"])
def test_truncated_file_is_detected(ckpts, victim):
    from o2mkd_ray.distill.checkpoints import verify_checkpoint
    from o2mkd_ray.errors import CheckpointError

    _, _, _, _, c4 = ckpts
    f = c4 / victim
    f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 2)])
    with pytest.raises(CheckpointError, match=rf"{victim.split('/')[-1]}.*truncated"):
        verify_checkpoint(c4)


def test_missing_file_and_broken_manifest_are_detected(ckpts):
    from o2mkd_ray.distill.checkpoints import MANIFEST, verify_checkpoint
    from o2mkd_ray.errors import CheckpointError

    _, _, _, c2, c4 = ckpts
    (c4 / "train_state.pt").unlink()
    with pytest.raises(CheckpointError, match="train_state.pt is missing"):
        verify_checkpoint(c4)
    (c2 / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupted"):
        verify_checkpoint(c2)
    (c2 / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="not an o2mkd-ray checkpoint"):
        verify_checkpoint(c2)


def test_config_hash_mismatch_is_detected(ckpts, tiny_overrides):
    from o2mkd_ray.distill.checkpoints import verify_checkpoint
    from o2mkd_ray.errors import CheckpointError

    cfg, _, _, _, c4 = ckpts
    verify_checkpoint(c4, cfg)
    other = _cfg(tiny_overrides, "students.width=0.75")
    with pytest.raises(CheckpointError, match="different config"):
        verify_checkpoint(c4, other)
    # what a checkpoint means is teacher/segments/students/kd/data: a new step budget is the same run
    verify_checkpoint(c4, _cfg(tiny_overrides, "train.steps=999"))


def test_load_restores_the_exact_state(ckpts):
    cfg, dist, _, _, c4 = ckpts
    fresh, _ = _distiller(cfg)
    assert fresh.load(c4)["step"] == 4 and fresh.step == 4
    for a, b in zip(fresh.student.state_dict().values(), dist.student.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(fresh.ema.state_dict().values(), dist.ema.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(fresh.gen.get_state(), dist.gen.get_state())
    assert fresh.opt.state_dict()["state"].keys() == dist.opt.state_dict()["state"].keys()


class _FakeCheckpoint:
    """Stand-in for ray.train.Checkpoint on a local folder: ``as_directory()`` yields the path."""

    def __init__(self, path: Path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def test_restore_falls_back_to_the_previous_checkpoint(ckpts):
    from o2mkd_ray.distill.checkpoints import restore_checkpoint

    cfg, _, _, _, c4 = ckpts
    w = c4 / "student" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])  # the newest checkpoint is truncated
    fresh, _ = _distiller(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert restore_checkpoint(fresh, _FakeCheckpoint(c4), cfg) == 2
    msgs = [str(w.message) for w in caught]
    assert any("unusable" in m and "checkpoint_000004" in m for m in msgs), msgs
    assert any("earlier checkpoint checkpoint_000002" in m for m in msgs), msgs
    assert fresh.step == 2


def test_restore_with_no_usable_checkpoint_starts_over(ckpts):
    from o2mkd_ray.distill.checkpoints import restore_checkpoint

    cfg, _, _, c2, c4 = ckpts
    for c in (c2, c4):
        (c / "train_state.pt").write_bytes(b"")
    fresh, _ = _distiller(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert restore_checkpoint(fresh, c4) == 0  # a plain folder works as well as a Ray Checkpoint
    assert "no usable checkpoint" in str(caught[-1].message), [str(w.message) for w in caught]
    assert fresh.step == 0


def test_run_folders_saved_before_a_new_key_keep_resuming():
    """A config saved before ``students.transformer_layers_per_block`` (or ``students.depth``,
    ``data.synth_samples``) existed hashes as the same run when the key has its default (so its folder resumes),
    and as another run once it is set."""
    from o2mkd_ray.config.loading import from_dict
    from o2mkd_ray.distill.run_folder import run_hash

    now = from_dict({}).to_dict()
    new = {"students": ("transformer_layers_per_block", "depth"), "data": ("synth_samples",)}
    old = {**now, **{sec: {k: v for k, v in now[sec].items() if k not in keys} for sec, keys in new.items()}}
    assert run_hash(old) == run_hash(now)
    for section, key, value in (("students", "transformer_layers_per_block", [1, 1]), ("students", "depth", 0.5),
                                ("data", "synth_samples", 8)):
        changed = {**now, section: {**now[section], key: value}}
        assert run_hash(old) != run_hash(changed), key
