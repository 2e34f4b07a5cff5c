"""Run-time acceleration (channels_last, torch.compile): off by default, bounded difference on, never saved."""

import conftest
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from o2mkd_ray import MultiStudentUNet, O2MKDPipeline

BOUNDS = (0, 300, 700, 1000)


def make_pipe(seed0: int = 0) -> O2MKDPipeline:
    students = [conftest.tiny_unet(in_channels=3, seed=seed0 + k) for k in range(3)]
    pipe = O2MKDPipeline(students=MultiStudentUNet(students, boundaries=BOUNDS).eval(),
                         scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, steps: int = 3, batch: int = 2) -> np.ndarray:
    # 3 DDIM steps (666, 333, 0) visit students 1, 1, 0; 4 steps (750, 500, 250, 0) visit all three
    g = torch.Generator().manual_seed(0)
    return pipe(batch_size=batch, generator=g, num_inference_steps=steps, output_type="np").images


def test_channels_last_bounded_then_undone_and_not_saved(tmp_path):
    pipe = make_pipe()
    off = sample(pipe, 4)
    pipe.accelerate(channels_last=True)
    conv = pipe.students.student(0).conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    on = sample(pipe, 4)
    assert np.abs(on - off).max() < 1e-4  # same math, another summation order

    pipe.save_pretrained(tmp_path / "p")  # saved in the default layout, the run-time option is not saved
    assert pipe.students.student(0).conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    loaded = O2MKDPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert not loaded.students.acceleration.enabled
    np.testing.assert_array_equal(sample(loaded, 4), off)  # the weights saved are the unaccelerated ones

    pipe.accelerate()  # undo: bit-identical again
    assert pipe.students.student(0).conv_in.weight.is_contiguous()
    np.testing.assert_array_equal(sample(pipe, 4), off)


def test_compile_one_graph_per_student_no_recompile_across_runs():
    """Each student gets its own compiled wrapper: after a first run visited every student, a second run (same
    batch, other timesteps) compiles nothing. The eager backend keeps this fast; recompilation is decided by Dynamo's guards,
    not by the backend. (Students of one architecture even share one graph: their weights are graph inputs.)"""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    pipe = make_pipe().accelerate(compile=True, compile_kwargs={"backend": "eager"})
    off = sample(make_pipe(), 4)
    first = sample(pipe, 4)
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    assert graphs >= 1 and frames >= 1  # the students did run compiled
    # that run moved between all three students (steps 750, 500, 250, 0): at most one graph each
    assert graphs <= pipe.students.num_students, f"{graphs} graphs for one run: a graph per step?"
    second = sample(pipe, 5)  # other timestep values: a graph specialised on them would recompile
    assert (counters["stats"]["unique_graphs"], counters["frames"]["total"]) == (graphs, frames), (
        "sampling again recompiled a student")
    assert np.abs(first - off).max() < 1e-5
    assert np.abs(second - sample(make_pipe(), 5)).max() < 1e-5
    # the modules in the ModuleList (what state_dict and save_pretrained see) are still the plain students
    assert all(type(s).__name__ == "UNet2DModel" for s in pipe.students.students)
    pipe.accelerate()
    np.testing.assert_array_equal(sample(pipe, 4), off)


@pytest.mark.slow
def test_inductor_compile_and_channels_last_bounded():
    """The real CPU compiler (C++ code generation, tens of seconds): images within a small bound of eager."""
    torch._dynamo.reset()
    pipe = make_pipe()
    off = sample(pipe, 3)
    on = sample(pipe.accelerate(compile=True, channels_last=True), 3)
    assert np.abs(on - off).max() < 1e-3


@torch.no_grad()
def test_channels_last_mixed_batch_and_conditioning():
    """Per-sample routing with a channels_last input and per-sample kwargs (what the text-to-image pipeline's
    conditioning goes through) stays within float rounding of the options-off output."""
    students = [conftest.tiny_unet(in_channels=3, seed=k, num_class_embeds=4) for k in range(2)]
    m = MultiStudentUNet(students, boundaries=(0, 500, 1000)).eval()
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([900, 10, 600, 20]), torch.tensor([0, 1, 2, 3])
    off = m(x, t, class_labels=y).sample
    on = m.accelerate(channels_last=True)(x, t, class_labels=y).sample
    assert m.acceleration.channels_last
    torch.testing.assert_close(on, off, rtol=0, atol=1e-5)
    torch.testing.assert_close(m.accelerate()(x, t, class_labels=y).sample, off, rtol=0, atol=0)


def test_saved_folder_byte_identical_with_every_option(tmp_path):
    """compile + channels_last on, then save_pretrained: every file equals the one saved without options (no
    option in model_index.json or the config, no compiled-wrapper keys such as ``_orig_mod.`` in the weights,
    weights in the default layout)."""
    plain = make_pipe()
    plain.save_pretrained(tmp_path / "plain")
    pipe = make_pipe().accelerate(compile=True, channels_last=True, compile_kwargs={"backend": "eager"})
    pipe.save_pretrained(tmp_path / "accelerated")
    files = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "accelerated")
                           for p in (tmp_path / "accelerated").rglob("*") if p.is_file())
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "accelerated" / f).read_bytes(), f


@torch.no_grad()
def test_one_owner_batch_is_passed_through_without_copies():
    """Whole batch on one student (a number, a 0-d tensor or a (B,) tensor of one segment): the student gets the
    caller's very tensor and its output is returned as is; only a mixed batch is sliced."""
    m = MultiStudentUNet([conftest.tiny_unet(in_channels=3, seed=k) for k in range(3)], boundaries=BOUNDS).eval()
    seen = []
    for s in m.students:
        s.register_forward_pre_hook(lambda mod, args: seen.append(args[0].data_ptr()))
        s.register_forward_hook(lambda mod, args, out: seen.append(out[0].data_ptr()))
    x = torch.randn(4, 3, 8, 8)
    for t in (500, torch.tensor(500), torch.tensor([400, 500, 600, 650])):
        seen.clear()
        eps = m(x, t).sample
        assert seen == [x.data_ptr(), eps.data_ptr()], f"timestep {t}: the one-owner path copied"
    seen.clear()
    m(x, torch.tensor([10, 500, 900, 20]))
    assert len(seen) == 6 and x.data_ptr() not in seen  # mixed: 3 students, each on its own slice


def test_text_to_image_pipeline_accelerates_its_unet_students(tiny_sd_dir):
    """O2MKDStableDiffusionPipeline.accelerate reaches the students inside its ``unet`` component: channels_last
    weights, images (guidance: a batch of 2 per UNet call, text conditioning) within float rounding of options
    off, and accelerate() undoes it bit-exactly."""
    from diffusers import StableDiffusionPipeline

    from o2mkd_ray.pipelines.stable_diffusion import O2MKDStableDiffusionPipeline

    teacher = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    students = MultiStudentUNet([teacher.unet] * 2, boundaries=(0, 500, 1000)).eval()
    pipe = O2MKDStableDiffusionPipeline.from_teacher(teacher, students)
    pipe.set_progress_bar_config(disable=True)

    def images():
        return pipe("a red cube", num_inference_steps=3, guidance_scale=7.5, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    off = images()
    pipe.accelerate(channels_last=True)
    assert pipe.unet.acceleration.channels_last
    assert all(s.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and not s.conv_in.weight.is_contiguous()
               for s in pipe.unet.students)
    assert np.abs(images() - off).max() < 1e-4
    pipe.accelerate()
    np.testing.assert_array_equal(images(), off)

