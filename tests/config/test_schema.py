"""The pydantic config schema: defaults, round trip, derived segment count, strict types, and one-line errors in the
package's own words (pydantic's text never reaches a user)."""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import pytest

from o2mkd_ray.config.loading import build_section, from_dict, known_keys
from o2mkd_ray.config.schema import (
    Config,
    DataConfig,
    KDConfig,
    SegmentsConfig,
    StudentsConfig,
    TeacherConfig,
    TrainConfig,
)
from o2mkd_ray.errors import ConfigError

# Config().to_dict() as the dataclass schema produced it: every default, key and nesting
DEFAULTS = {
    "name": "o2mkd",
    "teacher": {"pretrained": None, "kind": "auto", "subfolder": None, "factory": None, "mode": "actor", "replicas": 1,
                "num_cpus": 0.5, "num_gpus": 0.0, "max_batch": 512, "max_wait_ms": 2.0, "max_concurrency": 2,
                "max_restarts": 3, "dtype": "float32"},
    "segments": {"n": 3, "boundaries": None, "fractions": None},
    "students": {"width": 0.5, "depth": None, "layers_per_block": None, "unet": None, "init": "teacher", "drop_mid_block": False,
                 "transformer_layers_per_block": None},
    "kd": {"lambda_out": 1.0, "lambda_feat": 0.1, "lambda_task": 0.0, "feature_method": "fitnet",
           "feature_blocks": None},
    "data": {"kind": "digits", "name": None, "path": None, "split": "train", "image_key": "image",
             "caption_key": "caption", "image_root": None, "max_prompts": None, "uncond_prob": 0.1, "synth_steps": 20,
             "synth_guidance": 7.5, "synth_samples": 64, "resolution": 16, "channels": 1, "value_range": [-1.0, 1.0], "random_flip": False,
             "download": False},
    "train": {"steps": 600, "batch_size": 64, "lr": 0.001, "weight_decay": 0.0, "grad_clip": 1.0, "ema_decay": 0.995,
              "warmup_steps": 20, "seed": 0, "checkpoint_every": 100, "log_every": 10, "val_batches": 2,
              "select": "final",
              "num_threads": 0},
    "sampling": {"scheduler": "ddim", "steps": 50, "num_images": 16, "eta": 0.0, "seed": 0, "guidance_scale": 7.5,
                 "prompts": None, "negative_prompt": None},
    "ray": {"address": None, "num_cpus": None, "workers_per_segment": 1, "placement": "pack", "cpus_per_worker": 0.5,
            "gpus_per_worker": 0.0, "segment_overrides": {}, "storage_path": None, "max_failures": 2, "num_to_keep": 2,
            "health_check_interval_s": 0.3, "dashboard_host": "127.0.0.1"},
    "mlflow": {"enabled": True, "tracking_uri": None, "experiment": "o2mkd", "log_pipeline": True, "timeout_s": 5.0},
    "eval": {"enabled": True, "num_images": 16, "steps": 20, "fid_weights": None, "clip_model": None},
    "debug": {},
}

# a config that touches every kind of field: unions, lists, nested mappings, the open debug mapping
RICH = {
    "name": "rich",
    "segments": {"fractions": [0.25, 0.5, 0.75]},
    "students": {"width": [0.5, 1, 0.25, 2.0], "layers_per_block": [1, 2, 1, 2], "unet": {"block_out_channels": [4]}},
    "kd": {"feature_blocks": ["mid_block"], "lambda_task": 1},
    "data": {"kind": "image_folder", "path": "/data/imgs", "value_range": [0, 1], "max_prompts": 5},
    "train": {"lr": 1, "select": "best"},
    "sampling": {"prompts": ["a cat"], "eta": 1},
    "ray": {"address": "ray://10.0.0.1:10001", "segment_overrides": {"3": {"num_workers": 2, "gpus_per_worker": 1}}},
    "debug": {"kill_worker": {"segment": 1, "rank": 0, "step": 3}, "something_else": [1, 2]},
}


def _error(fn) -> str:
    with pytest.raises(ConfigError) as info:
        fn()
    return str(info.value)


def test_defaults_are_unchanged():
    assert Config().to_dict() == DEFAULTS
    assert from_dict({}).to_dict() == DEFAULTS
    assert json.loads(Config().to_json()) == DEFAULTS
    assert list(Config().to_dict()) == list(DEFAULTS)  # same key order in config.json


@pytest.mark.parametrize("data", [{}, RICH], ids=["defaults", "rich"])
def test_to_dict_from_dict_round_trip(data):
    cfg = from_dict(data)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain, JSON-safe
    again = from_dict(d)
    assert again == cfg
    assert again.to_dict() == d
    assert copy.deepcopy(cfg) == cfg


def test_rich_values_are_normalised():
    cfg = from_dict(RICH)
    assert cfg.students.width == [0.5, 1.0, 0.25, 2.0] and all(type(w) is float for w in cfg.students.width)
    assert type(cfg.train.lr) is float and cfg.train.lr == 1.0
    assert cfg.data.value_range == [0.0, 1.0]
    assert cfg.ray.segment_overrides["3"].num_workers == 2
    assert cfg.to_dict()["ray"]["segment_overrides"] == {"3": {"num_workers": 2, "cpus_per_worker": None,
                                                               "gpus_per_worker": 1.0}}
    assert cfg.debug["something_else"] == [1, 2]


@pytest.mark.parametrize("segments, n", [
    ({"boundaries": [0, 100, 400, 1000]}, 3),
    ({"boundaries": [0, 1000], "n": 5}, 1),
    ({"fractions": [0.5]}, 2),
    ({"fractions": [0.1, 0.2, 0.3, 0.4], "n": 2}, 5),
    ({"n": 4}, 4),
])
def test_segment_count_is_derived_while_building(segments, n):
    assert from_dict({"segments": segments}).segments.n == n
    assert SegmentsConfig(**segments).n == n  # built in code, too


def test_building_does_not_change_the_input_or_the_result():
    data = copy.deepcopy(RICH)
    first = from_dict(data, ["train.steps=5"]).to_dict()
    second = from_dict(data, ["train.steps=5"]).to_dict()
    assert data == RICH  # the caller's data is untouched, overrides included
    assert first == second
    assert from_dict(first).to_dict() == first  # building a built config again changes nothing
    built = from_dict({"segments": {"boundaries": [0, 10, 20]}})
    before = built.to_dict()
    from_dict(before)
    assert built.to_dict() == before


def test_sections_are_plain_assignable_objects():
    cfg = Config()
    cfg.eval.enabled = False
    cfg.students.init = "scratch"
    cfg.ray.gpus_per_worker, cfg.teacher.num_gpus = 0.5, 0.5
    assert cfg.to_dict()["eval"]["enabled"] is False and cfg.students.init == "scratch"
    clone = copy.deepcopy(cfg)
    clone.train.steps = 1
    assert cfg.train.steps == 600
    assert TrainConfig(steps=3).steps == 3
    with warnings.catch_warnings():  # an assigned value is not checked, and dumping it warns nobody (stderr stays clean)
        warnings.simplefilter("error")
        cfg.students.width = [1, 2]
        assert cfg.to_dict()["students"]["width"] == [1, 2]
    assert Config(students=StudentsConfig(width=[0.5, 1.0])).students.width == [0.5, 1.0]


@pytest.mark.parametrize("override, line", [
    ("train.steps=true", "train.steps: expected an integer, got True"),
    # one budget or one per segment: the member the input was meant for speaks, naming a bad entry
    ("train.steps=0", "train.steps: must be > 0, got 0"),
    ("train.steps=[300, 0, 300]", "train.steps[1]: must be > 0, got 0"),
    ("train.steps=[300, 'x', 300]", "train.steps[1]: expected an integer, got 'x'"),
    ("train.steps='3'", "train.steps: expected an integer, got '3'"),
    ("train.steps=2.0", "train.steps: expected an integer, got 2.0"),
    ("train.lr='0.1'", "train.lr: expected a number, got '0.1'"),
    ("train.lr=true", "train.lr: expected a number, got True"),
    ("mlflow.enabled=1", "mlflow.enabled: expected true or false, got 1"),
    ("name=3", "name: expected a string, got 3"),
    ("teacher.pretrained=3", "teacher.pretrained: expected str or null, got 3"),
    ("ray.num_cpus=1.5", "ray.num_cpus: expected int or null, got 1.5"),
    ("students.width=[0.5,'x',1]", "students.width[1]: expected a number, got 'x'"),
])
def test_types_are_strict(override, line):
    assert _error(lambda: from_dict({}, [override])) == line


@pytest.mark.parametrize("data, overrides, line", [
    ({}, ["train.stepz=3"], "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ({"train": {"stepz": 3}}, [], "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ({"trian": {}}, [], "unknown config key 'trian'; did you mean 'train'?"),
    ({"ray": {"segment_overrides": {"0": {"num_workrs": 1}}}}, [],
     "unknown config key 'ray.segment_overrides.0.num_workrs'; did you mean 'ray.segment_overrides.0.num_workers'?"),
    ({}, ["ray.segment_overrides.7.num_workers=x"], "ray.segment_overrides.7.num_workers: expected int or null, got 'x'"),
    ({}, ["ray.segment_overrides.1.num_workers=0"], "ray.segment_overrides.1.num_workers: must be > 0, got 0"),
    ({}, ["ray.segment_overrides={'7': {num_workers: 1}}"], "ray.segment_overrides.7: keys are segment indices 0..2"),
    ({}, ["segments.fractions=[0.6,0.3]"],
     "segments.fractions[1]: cut points must increase strictly inside (0, 1), got 0.3"),
    ({}, ["data.value_range=[1,'x']"], "data.value_range[1]: expected a number, got 'x'"),
    ({}, ["data.value_range=[1.0,-1.0]"], "data.value_range: expected [low, high] with low < high, got [1.0, -1.0]"),
    ({}, ["train.select=last"], "train.select: must be one of 'final' | 'best', got 'last'"),
    ({}, ["train.batch_size=0"], "train.batch_size: must be > 0, got 0"),
    ({}, ["train.lr=0"], "train.lr: must be > 0, got 0.0"),
    ({}, ["train.weight_decay=-1"], "train.weight_decay: must be >= 0, got -1.0"),
    ({}, ["train.ema_decay=1"], "train.ema_decay: must be in [0, 1), got 1.0"),
    ({}, ["sampling.eta=2"], "sampling.eta: must be in [0, 1], got 2.0"),
    ({}, ["teacher.max_restarts=-2"], "teacher.max_restarts: must be >= 0 (or -1 for no limit), got -2"),
    ({}, ["students.width=[0.5,0.5]"], "students.width: got 2 widths for 3 segments; give one number or 3"),
    # DiT: a depth share per segment, class-labelled data only for a class-conditional teacher
    ({}, ["students.depth=1.5"], "students.depth: the share of the teacher's blocks kept must be in (0, 1], got 1.5"),
    ({}, ["students.depth=[0.5,0.5]"], "students.depth: got 2 values for 3 segments"),
    ({}, ["teacher.kind=unet", "data.kind=classes"],
     "data.kind: classes need a class-conditional teacher; set teacher.pretrained to a DiT folder (teacher.kind=dit)"),
    ({}, ["teacher.kind=dit"], ("data.kind: a DiT teacher distils on class-labelled latents; set data.kind=classes "
                                "(got 'digits'), with data.path a folder of one subfolder per class, or none to let "
                                "the teacher sample them")),
    ({}, ["debug.kill_workr={step: 3}"], "unknown config key 'debug.kill_workr'; did you mean 'debug.kill_worker'?"),
    ({"train": [1]}, [], "train: expected a mapping, got [1]"),
    ([1, 2], [], "config: expected a mapping, got [1, 2]"),
    # two mistakes: a wrong type is reported before a bad value, and the first written before the second
    ({"train": {"steps": 0}, "name": 3}, [], "name: expected a string, got 3"),
    ({"train": {"steps": "x"}, "name": 3}, [], "train.steps: expected an integer, got 'x'"),
])
def test_error_lines_keep_their_wording(data, overrides, line):
    assert _error(lambda: from_dict(data, overrides)) == line


BAD = [
    ({}, ["train.steps=abc"]), ({}, ["train.steps=-5"]), ({}, ["teacher.factory=nocolon"]),
    ({}, ["teacher.pretrained=a", "teacher.factory=m:f"]), ({}, ["segments.boundaries=[0,500,400,1000]"]),
    ({}, ["segments.boundaries=[0,500]", "segments.fractions=[0.5]"]), ({}, ["students.layers_per_block=0"]),
    ({}, ["kd.lambda_out=0", "kd.lambda_feat=0"]), ({}, ["data.kind=image_folder"]), ({}, ["data.channels=2"]),
    ({}, ["teacher.kind=stable_diffusion"]), ({}, ["sampling.prompts=[]"]), ({}, ["ray.address=nohost"]),
    ({}, ["ray.cpus_per_worker=0"]), ({}, ["ray.segment_overrides.1=3"]), ({}, ["debug.marker=3"]), ({}, ["debug=3"]),
    ({}, ["students.unet=3"]), ({}, ["data.kind=nope"]), ({"teacher": "x"}, []), ("x", []),
]


@pytest.mark.parametrize("data, overrides", BAD)
def test_pydantic_text_never_reaches_the_user(data, overrides):
    msg = _error(lambda: from_dict(data, overrides))
    assert len(msg.splitlines()) == 1
    for pydantic_words in ("validation error", "pydantic", "Input should", "Value error", "type=", "[type"):
        assert pydantic_words.lower() not in msg.lower(), msg


@pytest.mark.parametrize("build, line", [
    (lambda: TrainConfig(steps="3"), "train.steps: expected an integer, got '3'"),
    (lambda: TrainConfig(stepz=3), "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    (lambda: SegmentsConfig(n=0), "segments.n: must be > 0, got 0"),
    (lambda: KDConfig(lambda_out=0, lambda_feat=0), "kd: all of kd.lambda_out, kd.lambda_feat, kd.lambda_task are 0; "
                                                    "nothing to train"),
    (lambda: Config(train={"steps": True}), "train.steps: expected an integer, got True"),
    (lambda: build_section(TeacherConfig, {"replicas": "x"}), "replicas: expected int or 'per_node', got 'x'"),
    (lambda: build_section(TeacherConfig, {"replicas": 0}, "teacher"),
     "teacher.replicas: must be >= 1 or 'per_node', got 0"),
    (lambda: Config(ray={"placement": "scatter"}), "ray.placement: must be one of 'spread' | 'pack', got 'scatter'"),
    (lambda: build_section(TeacherConfig, {"replica": 1}, "teacher"),
     "unknown config key 'teacher.replica'; did you mean 'teacher.replicas'?"),
    (lambda: build_section(DataConfig, 3, "data"), "data: expected a mapping, got 3"),
])
def test_sections_built_in_code_raise_config_errors(build, line):
    assert _error(build) == line


def test_rules_between_sections_apply_to_a_loaded_run_only():
    # code may assemble a config for a number of students given separately (build_students(cfg, teacher, 2))
    cfg = Config(students=StudentsConfig(width=[0.5, 1.0]))
    assert cfg.segments.n == 3
    with pytest.raises(ConfigError, match=r"students\.width: got 2 widths for 3 segments"):
        from_dict(cfg.to_dict())


def test_build_section_validates_a_plain_dataclass():
    @dataclasses.dataclass
    class Job:  # like distill/teacher_train.py's TeacherTrainConfig
        unet: dict = dataclasses.field(default_factory=dict)
        data: DataConfig = dataclasses.field(default_factory=DataConfig)
        steps: int = 4
        lr: float = 2e-3

    job = build_section(Job, {"data": {"resolution": 8}, "steps": 2, "lr": 1})
    assert isinstance(job, Job) and isinstance(job.data, DataConfig)
    assert (job.data.resolution, job.steps, job.lr, type(job.lr)) == (8, 2, 1.0, float)
    assert build_section(Job, None) == Job()
    assert _error(lambda: build_section(Job, {"stepz": 1})) == "unknown config key 'stepz'; did you mean 'steps'?"
    assert _error(lambda: build_section(Job, {"steps": True})) == "steps: expected an integer, got True"
    assert _error(lambda: build_section(Job, {"data": {"resolution": 0}})) == "data.resolution: must be > 0, got 0"


def test_debug_stays_an_open_mapping():
    cfg = from_dict({}, ["debug.anything=1", "debug.kill_teacher_after_requests=2"])
    assert cfg.debug == {"anything": 1, "kill_teacher_after_requests": 2}
    assert _error(lambda: from_dict({}, ["debug.kill_teacher_after_requests=0"])) == (
        "debug.kill_teacher_after_requests: expected an integer >= 1, got 0")


def test_known_keys_and_mapping_sub_keys():
    keys = known_keys()
    assert keys[:2] == ["name", "teacher.pretrained"] and len(keys) == len(set(keys)) == 90  # 88 + students.depth, data.synth_samples
    assert {"students.unet", "ray.segment_overrides", "debug", "segments.n"} <= set(keys)
    cfg = from_dict({}, ["students.unet.sample_size=8", "ray.segment_overrides.0.num_workers=2", "debug.marker=/m"])
    assert cfg.students.unet == {"sample_size": 8}
    assert cfg.ray.segment_overrides["0"].num_workers == 2
    assert cfg.debug == {"marker": "/m"}
