"""Text-to-image data without Ray: caption sources, cached latents + text embeddings, condition dropout, the
conditional teacher callable, and the local engine end to end on a tiny Stable Diffusion folder."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROMPTS, ROOT, run_cli, sd_overrides


def _data(**kw):
    from o2mkd_ray.config.schema import DataConfig

    return DataConfig(kind="prompts", **kw)


def _png(path, color):
    from PIL import Image

    Image.new("RGB", (20, 20), color).save(path)


# ---------------------------------------------------------------------------------------------------------------
# caption sources


def test_captions_from_txt_csv_parquet_coco_json(tmp_path):
    from o2mkd_ray.data.build import check_data
    from o2mkd_ray.data.captions import read_captions

    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_captions(_data(path=str(tmp_path / "p.txt")))["caption"].tolist() == ["a cat", "a dog"]

    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "r.png", (255, 0, 0))
    _png(tmp_path / "imgs" / "g.png", (0, 255, 0))
    df = pd.DataFrame({"text": ["red", "green"], "file": ["r.png", "g.png"]})
    df.to_csv(tmp_path / "p.csv", index=False)
    df.to_parquet(tmp_path / "p.parquet")
    for f in ("p.csv", "p.parquet"):
        d = _data(path=str(tmp_path / f), caption_key="text", image_key="file", image_root=str(tmp_path / "imgs"))
        check_data(d)
        got = read_captions(d)
        assert got["caption"].tolist() == ["red", "green"]
        assert got["image"].tolist() == [str(tmp_path / "imgs" / "r.png"), str(tmp_path / "imgs" / "g.png")]

    coco = {"images": [{"id": 7, "file_name": "r.png"}, {"id": 9, "file_name": "g.png"}],
            "annotations": [{"image_id": 9, "caption": "green one"}, {"image_id": 7, "caption": "red one"},
                            {"image_id": 7, "caption": "another red"}]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    d = _data(path=str(tmp_path / "captions.json"), image_root=str(tmp_path / "imgs"), max_prompts=2)
    got = read_captions(d)
    assert got["caption"].tolist() == ["green one", "red one"]  # file order, first max_prompts
    assert got["image"].tolist() == [str(tmp_path / "imgs" / "g.png"), str(tmp_path / "imgs" / "r.png")]
    assert "image" not in read_captions(_data(path=str(tmp_path / "captions.json")))  # captions only


@pytest.mark.parametrize("make, kw, msg", [
    (None, {"path": "nope.txt"}, "does not exist"),
    ("x.tsv", {}, "unknown prompts format"),
    ("x.csv", {"caption_key": "prompt"}, "column 'prompt' not in"),
    ("x.json", {}, "not a COCO captions file"),
    ("x.txt", {"image_root": "no/such/dir"}, "data.image_root"),
    ("empty.txt", {}, "holds no prompts"),
])
def test_bad_prompt_sources_fail_in_one_line(tmp_path, make, kw, msg):
    from o2mkd_ray.data.build import check_data
    from o2mkd_ray.errors import ConfigError

    if make:
        p = tmp_path / make
        p.write_text({"x.csv": "text\nhello\n", "x.json": "{\"images\": []}", "empty.txt": "\n\n"}.get(make, "hi\n"))
        kw = {"path": str(p), **kw}
    with pytest.raises(ConfigError, match=msg) as e:
        check_data(_data(**kw))
    assert "\n" not in str(e.value)


def test_teacher_and_data_kinds_must_match(tiny_sd_dir, tiny_teacher_dir, prompts_file):
    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.core.teacher import teacher_kind
    from o2mkd_ray.core.teacher_checks import check_run
    from o2mkd_ray.errors import ConfigError

    sd = load_config(ROOT / "pipelines" / "tiny.yaml", sd_overrides(tiny_sd_dir, prompts_file))
    assert teacher_kind(sd.teacher) == "stable_diffusion"  # auto: read from the folder
    check_run(sd)
    with pytest.raises(ConfigError, match="data.kind: a Stable Diffusion teacher distils on captions"):
        check_run(load_config(ROOT / "pipelines" / "tiny.yaml", [f"teacher.pretrained={tiny_sd_dir}"]))
    with pytest.raises(ConfigError, match="prompts need a text-conditioned teacher"):
        check_run(load_config(ROOT / "pipelines" / "tiny.yaml", [f"teacher.pretrained={tiny_teacher_dir}",
                                                                 "data.kind=prompts", f"data.path={prompts_file}"]))
    with pytest.raises(ConfigError, match="set teacher.kind"):  # a hub id cannot be inspected offline
        check_run(load_config(ROOT / "pipelines" / "tiny.yaml", ["teacher.pretrained=org/some-sd",
                                                                 "data.kind=prompts", f"data.path={prompts_file}"]))


def test_incomplete_sd_folder_is_refused_before_any_work(tiny_sd_dir, prompts_file, tmp_path):
    import shutil

    broken = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    r = run_cli("distill", str(ROOT / "pipelines" / "tiny.yaml"), *sum((["--set", o] for o in
                sd_overrides(broken, prompts_file)), []), "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert "missing text_encoder/" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# cached latents and embeddings


def _sd_cfg(tiny_sd_dir, prompts_file, *extra):
    from o2mkd_ray.config.loading import load_config

    return load_config(ROOT / "pipelines" / "tiny.yaml", [*sd_overrides(tiny_sd_dir, prompts_file), *extra])


def test_cond_data_embeds_exactly_like_the_sd_pipeline_and_is_cached(tiny_sd_dir, prompts_file, tmp_path):
    from diffusers import StableDiffusionPipeline

    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.data.cond_cache import build_cond_data

    cfg = _sd_cfg(tiny_sd_dir, prompts_file)
    unet, sched = load_teacher(cfg.teacher)
    calls = []

    def teacher(x, t, features=False, cond=None):  # the teacher contract, counting synthesis calls
        calls.append(x.shape[0])
        return unet(x, t, encoder_hidden_states=cond).sample, None

    cond = build_cond_data(cfg, unet, dict(sched.config), teacher=teacher, cache_dir=tmp_path, log=lambda m: None)
    n = len(PROMPTS)
    assert cond["prompts"] == PROMPTS
    assert cond["latents"].shape == (n, 4, 8, 8) and cond["embeds"].shape == (n, 77, 16)
    assert np.isfinite(cond["latents"]).all()
    # 3 DDIM steps x (one CFG-doubled call per batch of <= 16 prompts)
    assert calls == [2 * n] * 3
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    pe, ne = pipe.encode_prompt(PROMPTS[1], "cpu", 1, True, "")
    assert torch.equal(torch.from_numpy(cond["embeds"][1]), pe[0])
    assert torch.equal(torch.from_numpy(cond["uncond"][0]), ne[0])

    files = list(tmp_path.glob("cond-*.safetensors"))
    assert len(files) == 1
    again = build_cond_data(cfg, unet, dict(sched.config), teacher=None, cache_dir=tmp_path, log=calls.append)
    assert any("reusing cache" in str(c) for c in calls)
    assert np.array_equal(again["latents"], cond["latents"]) and again["prompts"] == PROMPTS
    other = _sd_cfg(tiny_sd_dir, prompts_file, "data.synth_steps=2")
    build_cond_data(other, unet, dict(sched.config), cache_dir=tmp_path, log=lambda m: None)
    assert len(list(tmp_path.glob("cond-*.safetensors"))) == 2  # another synthesis setting, another cache


def test_cond_data_from_images_are_vae_latents(tiny_sd_dir, tmp_path):
    from o2mkd_ray.config.loading import load_config
    from o2mkd_ray.core.sd import decode_latents, load_sd_components
    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.data.cond_cache import build_cond_data

    (tmp_path / "imgs").mkdir()
    _png(tmp_path / "imgs" / "r.png", (255, 0, 0))
    _png(tmp_path / "imgs" / "b.png", (0, 0, 255))
    pd.DataFrame({"caption": ["red", "blue"], "image": ["r.png", "b.png"]}).to_csv(tmp_path / "p.csv", index=False)
    cfg = load_config(ROOT / "pipelines" / "tiny.yaml", [*sd_overrides(tiny_sd_dir, tmp_path / "p.csv"),
                                                        f"data.image_root={tmp_path / 'imgs'}"])
    unet, sched = load_teacher(cfg.teacher)

    def never(*a, **k):
        raise AssertionError("with images the teacher must not be sampled")

    cond = build_cond_data(cfg, unet, dict(sched.config), teacher=never, cache_dir=None, log=lambda m: None)
    assert cond["latents"].shape == (2, 4, 8, 8)
    vae = load_sd_components(str(tiny_sd_dir))["vae"]
    # exactly the posterior sample of the two 16x16 images (vae scale 2 x latent 8) drawn with the run's seed
    img = torch.full((2, 3, 16, 16), -1.0)
    img[0, 0] = 1.0  # red
    img[1, 2] = 1.0  # blue
    want = vae.encode(img).latent_dist.sample(generator=torch.Generator().manual_seed(cfg.train.seed))
    assert torch.allclose(torch.from_numpy(cond["latents"]), want * vae.config.scaling_factor, atol=1e-5)
    assert decode_latents(vae, torch.from_numpy(cond["latents"])).shape == (2, 3, 16, 16)


def test_condition_dropout_uses_the_empty_prompt(tiny_sd_dir, prompts_file):
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.students import build_students
    from o2mkd_ray.core.teacher import load_teacher
    from o2mkd_ray.distill.distiller import SegmentDistiller

    cfg = _sd_cfg(tiny_sd_dir, prompts_file, "data.uncond_prob=0.5", "kd.lambda_feat=0")
    unet, sched = load_teacher(cfg.teacher)
    uncond = torch.full((1, 77, 16), -7.0)
    dist = SegmentDistiller(cfg, 0, Segments.uniform(1000, 2), sched, build_students(cfg, unet, 2)[0], {},
                            uncond=uncond)
    cond = torch.randn(400, 77, 16)
    out = dist.make_cond(cond, torch.Generator().manual_seed(0))
    dropped = (out == -7.0).all(dim=(1, 2))
    kept = (out == cond).all(dim=(1, 2))
    assert bool((dropped | kept).all())
    assert 150 < int(dropped.sum()) < 250  # about half
    cfg.data.uncond_prob = 0.0
    assert dist.make_cond(cond) is cond


def test_local_engine_distils_a_tiny_sd_and_routes_sampling(tiny_sd_dir, prompts_file, tmp_path):
    from o2mkd_ray.engine.session import run_local
    from o2mkd_ray.pipelines.stable_diffusion import O2MKDStableDiffusionPipeline

    cfg = _sd_cfg(tiny_sd_dir, prompts_file, "train.steps=4", "train.checkpoint_every=2")
    report = run_local(cfg, tmp_path / "run", progress=False)
    assert [s["steps"] for s in report["segments"]] == [4, 4]
    assert report["teacher"]["requests"] > 0 and 0 < report["macs_ratio_per_step"] < 1
    assert report["samples"]["prompts"] == PROMPTS[:3]
    pipe = O2MKDStableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert pipe.unet.num_students == 2 and pipe.unet.config.boundaries == [0, 500, 1000]
    g = torch.Generator().manual_seed(0)
    img = pipe("a red square", num_inference_steps=3, guidance_scale=5.0, generator=g, output_type="np").images
    assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()
    assert (tmp_path / "run" / "samples.png").stat().st_size > 0


@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "pndm"])
def test_samples_png_compares_like_with_like(tiny_sd_dir, prompts_file, tmp_path, scheduler):
    """samples.png's teacher row and a students row built from the teacher's own UNet are identical: the two
    pipelines sample with the same scheduler config, noise and guidance."""
    import copy

    from o2mkd_ray.eval.sampling import write_sd_samples
    from o2mkd_ray.pipelines.build import build_sd_pipeline, teacher_sd_pipeline

    cfg = _sd_cfg(tiny_sd_dir, prompts_file, f"sampling.scheduler={scheduler}")
    teacher = teacher_sd_pipeline(cfg)
    pipe = build_sd_pipeline([copy.deepcopy(teacher.unet)], [0, 1000], teacher, scheduler)
    out = write_sd_samples(cfg, teacher, pipe, PROMPTS[:2], tmp_path / "s.png")
    assert out["pixel_mse_vs_teacher"] == 0.0 and (tmp_path / "s.png").is_file()


def test_missing_clip_model_folder_is_refused(tiny_sd_dir, prompts_file, tmp_path):
    sets = sum((["--set", o] for o in sd_overrides(tiny_sd_dir, prompts_file)), [])
    r = run_cli("distill", str(ROOT / "pipelines" / "tiny.yaml"), *sets, "--set", "eval.clip_model=no/clip",
                "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "eval.clip_model: folder 'no/clip' does not exist" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_sample_refuses_prompts_for_an_unconditional_pipeline(tiny_unet_pipeline_dir):
    r = run_cli("sample", str(tiny_unet_pipeline_dir), "--prompt", "a cat", "--steps", "2")
    assert r.returncode == 2 and "this pipeline is unconditional; drop --prompt" in r.stderr, r.stderr


@pytest.fixture()
def tiny_unet_pipeline_dir(tmp_path):
    from conftest import tiny_unet
    from diffusers import DDIMScheduler

    from o2mkd_ray import MultiStudentUNet, O2MKDPipeline

    d = tmp_path / "pipeline"
    O2MKDPipeline(students=MultiStudentUNet([tiny_unet()], boundaries=[0, 1000]),
                  scheduler=DDIMScheduler()).save_pretrained(d)
    return d


def test_captions_from_an_hf_dataset(tmp_path):
    """data.name: a Hugging Face dataset (here a local parquet dataset folder, loaded offline by `datasets`);
    list-valued caption columns (COCO: several captions per image) give their first caption."""
    from o2mkd_ray.data.build import check_data
    from o2mkd_ray.data.captions import read_captions

    (tmp_path / "coco").mkdir()
    pd.DataFrame({"caption": [["a cat", "a kitten"], ["a dog"], ["a bird"]],
                  "text_id": [1, 2, 3]}).to_parquet(tmp_path / "coco" / "train.parquet")
    d = _data(name=str(tmp_path / "coco"), split="train", max_prompts=2)
    assert check_data(d) == []
    assert read_captions(d)["caption"].tolist() == ["a cat", "a dog"]
