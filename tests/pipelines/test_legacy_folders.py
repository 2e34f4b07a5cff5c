"""Pipelines saved before the package was layered keep loading, and sample exactly what they sampled then.

The folders under ``tests/fixtures/legacy_227e553`` were written by o2mkd-ray at commit 227e553 (flat modules) with
``make_fixtures.py`` beside them: their ``model_index.json`` records ``["o2mkd_ray.multi_unet", "MultiStudentUNet"]``,
and the ``*_images.npy`` files hold what they sampled then from fixed seeds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT

LEGACY = ROOT / "tests" / "fixtures" / "legacy_227e553"


def _module_paths(folder) -> dict:
    return {k: v for k, v in json.loads((folder / "model_index.json").read_text()).items()
            if isinstance(v, list) and v[0] and v[0].startswith("o2mkd_ray")}


def test_unconditional_legacy_folder_loads_and_samples_as_saved(tmp_path):
    from o2mkd_ray import MultiStudentUNet, O2MKDPipeline

    assert _module_paths(LEGACY / "unconditional") == {"students": ["o2mkd_ray.multi_unet", "MultiStudentUNet"]}
    pipe = O2MKDPipeline.from_pretrained(LEGACY / "unconditional")
    assert isinstance(pipe.students, MultiStudentUNet) and list(pipe.students.boundaries) == [0, 500, 1000]
    img = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
               output_type="np").images
    np.testing.assert_allclose(img, np.load(LEGACY / "unconditional_images.npy"), rtol=0, atol=1e-6)

    pipe.save_pretrained(tmp_path / "resaved", safe_serialization=True)  # new saves record the layered path
    assert _module_paths(tmp_path / "resaved") == {
        "students": ["o2mkd_ray.pipelines.multi_unet", "MultiStudentUNet"]}
    again = O2MKDPipeline.from_pretrained(tmp_path / "resaved")
    img2 = again(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                 output_type="np").images
    np.testing.assert_array_equal(img2, img)


def test_text_to_image_legacy_folder_loads_and_samples_as_saved(tmp_path):
    pytest.importorskip("transformers")
    from o2mkd_ray import MultiStudentUNet, O2MKDStableDiffusionPipeline

    assert _module_paths(LEGACY / "text_to_image") == {"unet": ["o2mkd_ray.multi_unet", "MultiStudentUNet"]}
    pipe = O2MKDStableDiffusionPipeline.from_pretrained(LEGACY / "text_to_image")
    assert isinstance(pipe.unet, MultiStudentUNet) and list(pipe.unet.boundaries) == [0, 400, 1000]
    pipe.set_progress_bar_config(disable=True)

    def sample(p):
        return p(["a red bus", "a cat"], num_inference_steps=3, guidance_scale=5.0,
                 generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="np").images

    img = sample(pipe)
    np.testing.assert_allclose(img, np.load(LEGACY / "text_to_image_images.npy"), rtol=0, atol=1e-6)
    pipe.save_pretrained(tmp_path / "resaved", safe_serialization=True)
    assert _module_paths(tmp_path / "resaved") == {"unet": ["o2mkd_ray.pipelines.multi_unet", "MultiStudentUNet"]}
    again = O2MKDStableDiffusionPipeline.from_pretrained(tmp_path / "resaved")
    again.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(sample(again), img)


def test_old_module_paths_are_the_new_classes():
    """Each compatibility module re-exports exactly the class of its new home (no second definition)."""
    import importlib

    pairs = {"o2mkd_ray.multi_unet": ("o2mkd_ray.pipelines.multi_unet", "MultiStudentUNet"),
             "o2mkd_ray.pipeline": ("o2mkd_ray.pipelines.unconditional", "O2MKDPipeline"),
             "o2mkd_ray.sd_pipeline": ("o2mkd_ray.pipelines.stable_diffusion", "O2MKDStableDiffusionPipeline"),
             "o2mkd_ray.mlflow_model": ("o2mkd_ray.tracking.pyfunc", "PipelineModel")}
    for old, (new, cls) in pairs.items():
        assert getattr(importlib.import_module(old), cls) is getattr(importlib.import_module(new), cls)
