"""Bad input through the real CLI: exit code 2, ONE stderr line `error: ...` naming the key or path and the fix, no
traceback (unless --debug), and nothing written: the --out folder is not created, or left byte-for-byte unchanged.

Most cases call ``o2mkd_ray.cli.main`` in-process (capsys); the ones marked ``subprocess`` run the console entry
point for real (``python -m o2mkd_ray.cli``), which also proves the one-line contract holds for a fresh process.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli, tiny_unet

TINY = str(ROOT / "pipelines" / "tiny.yaml")


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _snapshot(path: Path) -> dict | None:
    """Every file under ``path`` with its bytes (None when the path does not exist)."""
    if not path.exists():
        return None
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


def _assert_one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, f"exit code {rc}, stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"stderr is not one line:\n{err}"
    line = lines[0]
    assert line.startswith("error: "), line
    for n in needles:
        assert n in line, f"{n!r} not in {line!r}"
    return line


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (rc, stderr)`` through ``o2mkd_ray.cli.main`` in this process."""
    from o2mkd_ray.cli.main import main

    def call(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse errors
            rc = e.code
        return rc, capsys.readouterr().err

    return call


@pytest.fixture
def distill_args(tiny_teacher_dir, tmp_path):
    """``distill tiny.yaml`` on the tiny teacher into ``tmp_path/out`` (which must never appear)."""
    out = tmp_path / "out"
    return ["distill", TINY, "--set", f"teacher.pretrained={tiny_teacher_dir}", "--set", "mlflow.enabled=false",
            "--out", str(out)], out


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved O2MKD pipeline folder (two tiny students), as `distill` writes to OUT/pipeline."""
    from diffusers import DDIMScheduler

    from o2mkd_ray.pipelines.build import build_pipeline

    d = tmp_path_factory.mktemp("pipe") / "pipeline"
    pipe = build_pipeline([tiny_unet(), tiny_unet(seed=1)], [0, 500, 1000], DDIMScheduler(num_train_timesteps=1000),
                          [-1.0, 1.0])
    pipe.save_pretrained(d, safe_serialization=True)
    return d


def _damaged_pipeline(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    (w,) = list((dst / "students").glob("*.safetensors"))
    data = w.read_bytes()
    if how == "truncate":
        w.write_bytes(data[: len(data) // 2])
    else:  # garbage
        w.write_bytes(b"\x00garbage" * 64)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# config-level input (no teacher needed): in-process


@pytest.mark.parametrize("overrides, needles", [
    pytest.param(["train.stepz=3"], ["unknown config key 'train.stepz'", "did you mean 'train.steps'"], id="unknown-key-set"),
    pytest.param(["train.steps=abc"], ["train.steps", "expected an integer"], id="wrong-type"),
    pytest.param(["train.steps=-5"], ["train.steps", "must be > 0", "-5"], id="negative-steps"),
    pytest.param(["train.batch_size=0"], ["train.batch_size", "must be > 0"], id="batch-size-0"),
    pytest.param(["segments.boundaries=[0,500,400,1000]"], ["segments.boundaries", "not strictly increasing",
                                                            "0 < b1 < ... < T"], id="boundaries-not-increasing"),
    pytest.param(["segments.boundaries=[10,500,1000]"], ["segments.boundaries", "must start at 0"],
                 id="boundaries-not-from-0"),
    pytest.param(["data.value_range=[1.0,-1.0]"], ["data.value_range", "low < high"], id="inverted-value-range"),
    pytest.param(["sampling.scheduler=ddimm"], ["sampling.scheduler", "unknown scheduler 'ddimm'",
                                                "did you mean 'ddim'"], id="unknown-scheduler"),
    pytest.param(["kd.lambda_out=0", "kd.lambda_feat=0", "kd.lambda_task=0"], ["kd.lambda_out", "nothing to train"],
                 id="lambdas-all-zero"),
    pytest.param(["kd.feature_method=fitnett"], ["kd.feature_method", "'fitnett'", "did you mean 'fitnet'",
                                                 "register_kd"], id="unknown-kd-method"),
    pytest.param(["students.width=[0.5,0.5]"], ["students.width", "2 widths for 3 segments"], id="width-count"),
    pytest.param(["segments.fractions=[0.6,0.3]"], ["segments.fractions[1]", "increase strictly"],
                 id="fractions-not-increasing"),
    pytest.param(["sampling.eta=2"], ["sampling.eta", "[0, 1]"], id="eta-out-of-range"),
    pytest.param(["ray.address=nohost"], ["ray.address", "host:port"], id="ray-address-malformed"),
    pytest.param(["ray.segment_overrides={'7': {num_workers: 1}}"], ["ray.segment_overrides.7", "0..2"],
                 id="segment-override-index"),
    pytest.param(["debug.kill_workr={step: 3}"], ["debug.kill_workr", "did you mean 'debug.kill_worker'"],
                 id="unknown-debug-switch"),
    pytest.param(["train.select=last"], ["train.select", "'final'"], id="bad-literal"),
])
def test_config_value_errors(cli, distill_args, overrides, needles):
    argv, out = distill_args
    rc, err = cli(*argv, *[a for o in overrides for a in ("--set", o)])
    _assert_one_line_error(rc, err, *needles)
    assert not out.exists()


def test_set_without_equals(cli, distill_args):
    argv, out = distill_args
    rc, err = cli(*argv, "--set", "train.steps")
    _assert_one_line_error(rc, err, "--set 'train.steps'", "KEY=VALUE")
    assert not out.exists()


def test_config_file_missing(cli, tmp_path):
    rc, err = cli("distill", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "nope.yaml", "does not exist")
    assert not (tmp_path / "out").exists()


def test_config_top_level_not_a_mapping(cli, tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- teacher\n- data\n")
    rc, err = cli("distill", str(f), "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "list.yaml", "top level must be a mapping")
    assert not (tmp_path / "out").exists()


def test_unknown_flag_is_one_line(cli, tmp_path):
    rc, err = cli("distill", TINY, "--sett", "x", "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "--sett", "--help")
    assert not (tmp_path / "out").exists()


def test_debug_flag_shows_the_traceback(tmp_path):
    from o2mkd_ray.cli.main import main
    from o2mkd_ray.errors import ConfigError

    for argv in (["--debug", "distill", TINY, "--set", "train.steps=-1"],
                 ["distill", TINY, "--set", "train.steps=-1", "--debug"]):
        with pytest.raises(ConfigError, match="train.steps"):
            main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# teacher-dependent input, checked in preflight before Ray: in-process


def test_boundaries_must_end_at_T(cli, distill_args):
    argv, out = distill_args
    rc, err = cli(*argv, "--set", "segments.boundaries=[0,500,900]")
    _assert_one_line_error(rc, err, "segments.boundaries", "num_train_timesteps (1000)", "end the list with 1000")
    assert not out.exists()


def test_more_segments_than_timesteps(cli, distill_args):
    argv, out = distill_args
    rc, err = cli(*argv, "--set", "segments.n=2000")
    _assert_one_line_error(rc, err, "segments.n", "2000", "n <= 1000")
    assert not out.exists()


def test_teacher_folder_missing(cli, tmp_path):
    rc, err = cli("distill", TINY, "--set", f"teacher.pretrained={tmp_path / 'no_teacher'}", "--out",
                  str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "teacher.pretrained", "no_teacher", "does not exist")
    assert not (tmp_path / "out").exists()


def test_teacher_weights_truncated(cli, tiny_teacher_dir, tmp_path):
    bad = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, bad)
    w = bad / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    rc, err = cli("distill", TINY, "--set", f"teacher.pretrained={bad}", "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "teacher.pretrained", "diffusion_pytorch_model.safetensors", "truncated")
    assert not (tmp_path / "out").exists()


def test_teacher_with_unknown_prediction_type(cli, tiny_teacher_dir, tmp_path):
    bad = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, bad)
    f = bad / "scheduler" / "scheduler_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "prediction_type": "flow"}))
    rc, err = cli("distill", TINY, "--set", f"teacher.pretrained={bad}", "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "prediction_type 'flow'", "v_prediction")
    assert not (tmp_path / "out").exists()


def test_factory_cannot_be_imported(cli, tmp_path):
    rc, err = cli("distill", TINY, "--set", "teacher.factory=no_such_module_o2r:make", "--out",
                  str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "teacher.factory", "no_such_module_o2r", "PYTHONPATH")
    assert not (tmp_path / "out").exists()


def test_factory_returns_the_wrong_thing(cli, tmp_path, monkeypatch):
    (tmp_path / "bad_factory_o2r.py").write_text("def make():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, err = cli("distill", TINY, "--set", "teacher.factory=bad_factory_o2r:make", "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "teacher.factory", "bad_factory_o2r:make", "(torch.nn.Module, diffusers scheduler)",
                           "got int")
    assert not (tmp_path / "out").exists()


def test_factory_missing_function(cli, tmp_path, monkeypatch):
    (tmp_path / "bad_factory2_o2r.py").write_text("x = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, err = cli("distill", TINY, "--set", "teacher.factory=bad_factory2_o2r:make", "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "teacher.factory", "no callable 'make'")
    assert not (tmp_path / "out").exists()


def test_empty_image_folder(cli, distill_args, tmp_path):
    argv, out = distill_args
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    rc, err = cli(*argv, "--set", "data.kind=image_folder", "--set", f"data.path={tmp_path / 'imgs'}")
    _assert_one_line_error(rc, err, "data.path", "holds no PNG/JPEG images")
    assert not out.exists()


def test_unreadable_image(cli, distill_args, tmp_path):
    argv, out = distill_args
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"not a png at all")
    rc, err = cli(*argv, "--set", "data.kind=image_folder", "--set", f"data.path={tmp_path / 'imgs'}")
    _assert_one_line_error(rc, err, "data.path", "a.png", "not a readable image")
    assert not out.exists()


def test_resolution_mismatch(cli, distill_args):
    argv, out = distill_args
    rc, err = cli(*argv, "--set", "data.resolution=16")
    _assert_one_line_error(rc, err, "data.resolution", "teacher works at 8", "set data.resolution=8")
    assert not out.exists()


def test_channels_mismatch(cli, distill_args):
    argv, out = distill_args
    rc, err = cli(*argv, "--set", "data.channels=3")
    _assert_one_line_error(rc, err, "data.channels", "set data.channels=1")
    assert not out.exists()


def test_out_is_a_file(cli, distill_args, tmp_path):
    argv, _ = distill_args
    f = tmp_path / "afile"
    f.write_text("keep me")
    rc, err = cli(*argv, "--out", str(f))
    _assert_one_line_error(rc, err, "--out", "afile", "is a file")
    assert f.read_text() == "keep me"


def test_out_holds_a_different_run(cli, distill_args, tmp_path):
    from o2mkd_ray.config.loading import load_config

    argv, out = distill_args
    out.mkdir()
    (out / "config.json").write_text(load_config(TINY, ["train.steps=999"]).to_json())
    (out / "ray").mkdir()
    (out / "ray" / "keep.txt").write_text("previous run")
    before = _snapshot(out)
    rc, err = cli(*argv)
    _assert_one_line_error(rc, err, "--out", "already holds a different run", "new --out")
    assert _snapshot(out) == before


def test_out_not_empty_and_not_a_run(cli, distill_args):
    argv, out = distill_args
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    before = _snapshot(out)
    rc, err = cli(*argv)
    _assert_one_line_error(rc, err, "--out", "not empty", "empty or new folder")
    assert _snapshot(out) == before


# ----------------------------------------------------------------------------------------------------------------
# sample: in-process


def test_sample_other_pipeline_class(cli, tiny_teacher_dir, tmp_path):
    out_png = tmp_path / "s.png"
    rc, err = cli("sample", str(tiny_teacher_dir), "--output", str(out_png))
    _assert_one_line_error(rc, err, "DDPMPipeline", "not an O2MKDPipeline", "DDPMPipeline.from_pretrained")
    assert not out_png.exists()


def test_sample_missing_model_index(cli, tiny_pipeline_dir, tmp_path):
    d = tmp_path / "pipeline"
    shutil.copytree(tiny_pipeline_dir, d)
    (d / "model_index.json").unlink()
    rc, err = cli("sample", str(d), "--output", str(tmp_path / "s.png"))
    _assert_one_line_error(rc, err, "no model_index.json", "OUT/pipeline")
    assert not (tmp_path / "s.png").exists()


def test_sample_truncated_weights(cli, tiny_pipeline_dir, tmp_path):
    d = _damaged_pipeline(tiny_pipeline_dir, tmp_path / "pipeline", "truncate")
    rc, err = cli("sample", str(d), "--output", str(tmp_path / "s.png"))
    _assert_one_line_error(rc, err, "pipeline:", "diffusion_pytorch_model.safetensors", "truncated")
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("flags, needles", [
    (["--steps", "0"], ["--steps", ">= 1"]),
    (["--num-images", "0"], ["--num-images", ">= 1"]),
    (["--steps", "5000"], ["--steps", "1000 training timesteps"]),
    (["--scheduler", "eulr"], ["--scheduler", "unknown scheduler 'eulr'", "did you mean 'euler'"]),
    (["--num-images", "two"], ["--num-images", "invalid int value"]),
], ids=["steps-0", "images-0", "steps-over-T", "unknown-scheduler", "images-not-int"])
def test_sample_bad_flags(cli, tiny_pipeline_dir, tmp_path, flags, needles):
    rc, err = cli("sample", str(tiny_pipeline_dir), "--output", str(tmp_path / "s.png"), *flags)
    _assert_one_line_error(rc, err, *needles)
    assert not (tmp_path / "s.png").exists()


def test_sample_good_folder_still_works(cli, tiny_pipeline_dir, tmp_path):
    rc, err = cli("sample", str(tiny_pipeline_dir), "--output", str(tmp_path / "s.png"), "--steps", "2",
                  "--num-images", "2")
    assert rc == 0, err
    assert (tmp_path / "s.png").stat().st_size > 100


# ----------------------------------------------------------------------------------------------------------------
# tune space (o2mkd_ray.tune.search is written by another contributor)


def test_tune_space_over_unknown_key(cli, tmp_path):
    tuning = pytest.importorskip("o2mkd_ray.tune.search")
    from o2mkd_ray.cli.main import build_parser

    space = tmp_path / "space.yaml"
    space.write_text("students.widht: {choice: [0.25, 0.5]}\n")
    out = tmp_path / "out"
    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    if "tune" in sub.choices:
        rc, err = cli("tune", TINY, str(space), "--out", str(out))
        _assert_one_line_error(rc, err, "students.widht", "did you mean 'students.width'")
    else:  # not wired into the CLI yet: the loader that `tune` will call
        from o2mkd_ray.errors import ConfigError

        with pytest.raises(ConfigError, match=r"students\.widht.*did you mean 'students\.width'"):
            tuning.load_space(space)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# the real console entry point (subprocess)


def _sub(*args: str):
    r = run_cli(*args, env={"OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}, timeout=180)
    return r.returncode, r.stderr


def test_subprocess_unknown_key_in_yaml(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("name: x\ntrian: {steps: 3}\n")
    rc, err = _sub("distill", str(f), "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "unknown config key 'trian'", "did you mean 'train'")
    assert not (tmp_path / "out").exists()


def test_subprocess_yaml_syntax_error(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text(textwrap.dedent("""\
        name: x
        train: {steps: 3
        data: {kind: digits}
    """))
    rc, err = _sub("distill", str(f), "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "broken.yaml", "line", "not valid YAML")
    assert not (tmp_path / "out").exists()


def test_subprocess_width_gives_zero_channels(tiny_teacher_dir, tmp_path):
    rc, err = _sub("distill", TINY, "--set", f"teacher.pretrained={tiny_teacher_dir}", "--set", "students.width=0.001",
                   "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "students.width", "0 channels", "at least 0.25")
    assert not (tmp_path / "out").exists()


def test_subprocess_unreachable_ray_address_fails_fast(tiny_teacher_dir, tmp_path):
    t0 = time.time()
    rc, err = _sub("distill", TINY, "--set", f"teacher.pretrained={tiny_teacher_dir}", "--set",
                   "ray.address=127.0.0.1:1", "--out", str(tmp_path / "out"))
    _assert_one_line_error(rc, err, "ray.address", "127.0.0.1:1", "ray start --head")
    assert time.time() - t0 < 60  # ray.init alone would retry for minutes
    assert not (tmp_path / "out").exists()


def test_subprocess_out_under_a_file(tiny_teacher_dir, tmp_path):
    # root ignores chmod, so "not writable" is a path no folder can be made under (like --out /etc/hostname/x)
    f = tmp_path / "afile"
    f.write_text("keep")
    rc, err = _sub("distill", TINY, "--set", f"teacher.pretrained={tiny_teacher_dir}", "--out", str(f / "x"))
    _assert_one_line_error(rc, err, "--out", "afile", "is a file", "choose another path")
    assert f.read_text() == "keep"


def test_subprocess_sample_corrupted_safetensors(tiny_pipeline_dir, tmp_path):
    d = _damaged_pipeline(tiny_pipeline_dir, tmp_path / "pipeline", "garbage")
    rc, err = _sub("sample", str(d), "--output", str(tmp_path / "s.png"))
    _assert_one_line_error(rc, err, "pipeline:", "safetensors", "corrupted")
    assert not (tmp_path / "s.png").exists()


def test_subprocess_dry_run_of_a_good_config_passes(tiny_teacher_dir, tmp_path):
    rc, err = _sub("distill", TINY, "--set", f"teacher.pretrained={tiny_teacher_dir}", "--dry-run", "--out",
                   str(tmp_path / "out"))
    assert rc == 0, err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# safe defaults, asserted statically over the code base


def _sources() -> list[Path]:
    return [p for d in ("o2mkd_ray", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py")]


def test_torch_load_always_weights_only():
    import re

    for p in _sources():
        for m in re.finditer(r"torch\.load\(([^)]*)\)", p.read_text()):
            assert "weights_only=True" in m.group(1), f"{p}: {m.group(0)}"


def test_no_pickle_of_our_own():
    import re

    for p in (ROOT / "o2mkd_ray").rglob("*.py"):
        text = p.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b", text, re.M), p
        assert "pickle.load" not in text and "yaml.load(" not in text, p


def test_servers_bind_loopback_by_default():
    from o2mkd_ray.config.schema import RayConfig

    assert RayConfig().dashboard_host == "127.0.0.1"
    for p in _sources():
        text = p.read_text()
        assert "0.0." + "0.0" not in text, f"{p} binds all interfaces"
    # the MLflow server used by tests/tracking binds loopback
    assert '"--host", "127.0.0.1"' in (ROOT / "tests" / "mlflow_server.py").read_text()


def test_yaml_is_loaded_safely():
    for p in (ROOT / "o2mkd_ray").rglob("*.py"):
        text = p.read_text()
        assert "yaml.load(" not in text and "yaml.unsafe_load" not in text and "yaml.full_load" not in text, p


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
