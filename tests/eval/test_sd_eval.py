"""Text-to-image evaluation: CLIP score on a tiny random CLIP, evaluate_sd on the tiny Stable Diffusion."""

import json

import numpy as np
import pytest
import torch
import transformers
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

from o2mkd_ray.core.fixtures import byte_vocab, make_tiny_sd
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.eval.clip import clip_score
from o2mkd_ray.eval.text_to_image import evaluate_sd
from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet
from o2mkd_ray.pipelines.stable_diffusion import O2MKDStableDiffusionPipeline

PROMPTS = ["a red cube", "two blue balls", "a cat"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP (text + vision towers, projection 8) with its processor, saved to a folder."""
    folder = tmp_path_factory.mktemp("clip")
    tok = CLIPTokenizer(vocab=byte_vocab(), merges=[], model_max_length=16)
    # the PIL image processor: CLIPImageProcessor needs torchvision (not installed), falls back with a warning
    image_cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    images = image_cls(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 16,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 4},
        projection_dim=8,
    ))
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd") / "sd"
    make_tiny_sd(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def o2mkd(teacher, students):
    scheduler = DDIMScheduler.from_config(teacher.scheduler.config)
    return O2MKDStableDiffusionPipeline.from_teacher(teacher, students, scheduler)


def half_width(unet):
    """A student at half the teacher's channels (same blocks, same cross-attention)."""
    torch.manual_seed(1)
    half = [c // 2 for c in unet.config.block_out_channels]
    cfg = {**unet.config, "block_out_channels": half, "norm_num_groups": 4}
    return UNet2DConditionModel.from_config(cfg).eval()


# ------------------------------------------------------------------------------------------------------------
# clip_score


def test_clip_score(clip_dir):
    rng = np.random.default_rng(0)
    images = rng.random((4, 16, 16, 3)).astype(np.float32)
    prompts = ["a red cube", "two blue balls", "a cat", "night sky"]
    s = clip_score(images, prompts, str(clip_dir))
    assert 0.0 <= s <= 100.0
    assert clip_score(images, prompts, clip_dir) == s  # same inputs, same score
    assert clip_score(images, ["zebra stripes", "%%%", "a dog", "sunrise"], clip_dir) != s
    big = rng.random((2, 40, 24, 3))  # any size: the processor resizes and crops
    assert 0.0 <= clip_score(big, prompts[:2], clip_dir) <= 100.0
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        clip_score(big, prompts[:3], clip_dir)


def test_clip_folder_errors(tmp_path, teacher):
    with pytest.raises(ConfigError, match="is not a folder") as e:
        clip_score(np.zeros((1, 8, 8, 3)), ["x"], tmp_path / "nowhere")
    assert "\n" not in str(e.value)
    teacher.unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ConfigError, match="holds no CLIP model"):
        clip_score(np.zeros((1, 8, 8, 3)), ["x"], tmp_path / "unet")
    pipe = o2mkd(teacher, MultiStudentUNet([teacher.unet], boundaries=[0, 1000]))
    with pytest.raises(ConfigError, match="clip_model"):  # before any sampling
        evaluate_sd(teacher, pipe, PROMPTS, clip_model=tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------------------
# evaluate_sd


def test_evaluate_sd_students_equal_teacher(teacher, clip_dir, tmp_path):
    pipe = o2mkd(teacher, MultiStudentUNet([teacher.unet] * 2, boundaries=[0, 500, 1000]))
    before = type(teacher.scheduler)
    rep = evaluate_sd(teacher, pipe, PROMPTS, steps=3, negative_prompt="blurry", clip_model=clip_dir,
                      out_dir=tmp_path / "eval", latency_repeats=1)
    m = rep["metrics"]
    assert type(teacher.scheduler) is before  # the teacher's scheduler is restored
    assert rep["teacher_images"].shape == (3, 16, 16, 3)
    assert np.array_equal(rep["teacher_images"], rep["student_images"])
    assert m["pixel_mse"] == 0.0 and m["pixel_psnr_db"] == rep["pixel"]["psnr_cap_db"]
    assert m["macs_ratio_run"] == 1.0 and m["student01_macs_ratio"] == 1.0
    assert m["teacher_macs_per_step"] > 0
    assert m["clip_score_teacher"] == m["clip_score_o2mkd"] and 0 <= m["clip_score_teacher"] <= 100
    assert "clip_score_skipped" not in rep
    assert rep["fid_backend"] == "random-conv" and "fid_o2mkd_vs_teacher" in m
    assert m["teacher_s_per_image"] > 0 and m["o2mkd_s_per_image"] > 0 and m["latency_speedup"] > 0
    assert rep["cost"]["unet_batch_per_image"] == 2 and rep["cost"]["text_shape"] == [1, 77, 16]
    assert (tmp_path / "eval" / "samples.png").stat().st_size > 0
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["metrics"] == pytest.approx(m) and "teacher_images" not in saved
    assert saved["settings"]["scheduler"] == "DDIMScheduler"


def test_evaluate_sd_smaller_student(teacher):
    small = half_width(teacher.unet)
    pipe = o2mkd(teacher, MultiStudentUNet([small, teacher.unet], boundaries=[0, 500, 1000]))
    rep = evaluate_sd(teacher, pipe, PROMPTS[:2], steps=4, guidance_scale=1.0, latency_repeats=0)
    m, cost = rep["metrics"], rep["cost"]
    assert cost["students"][0]["macs_per_step"] < cost["teacher"]["macs_per_step"]
    assert cost["students"][1]["macs_per_step"] == cost["teacher"]["macs_per_step"]
    assert [s["steps_in_run"] for s in cost["students"]] == [2, 2]  # DDIM 4 steps: 751, 501, 251, 1
    assert 0.5 < m["macs_ratio_run"] < 1.0
    assert m["student00_macs_ratio"] < 0.5  # half the channels: about a quarter of the MACs
    assert cost["unet_batch_per_image"] == 1  # guidance 1: no CFG
    assert m["pixel_mse"] > 0 and m["pixel_psnr_db"] < rep["pixel"]["psnr_cap_db"]
    assert "no clip_model" in rep["clip_score_skipped"] and rep["latency"] is None
    assert rep["files"] == []
