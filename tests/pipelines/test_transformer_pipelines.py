"""MultiStudentTransformer, O2MKDDiTPipeline and O2MKDStableDiffusion3Pipeline: bit-exact against diffusers' DiT and
SD3 pipelines, routing of (float) timesteps per step and per element, and persistence."""

import copy

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    StableDiffusion3Pipeline,
)

from o2mkd_ray import MultiStudentTransformer, O2MKDDiTPipeline, O2MKDStableDiffusion3Pipeline
from o2mkd_ray.core.transformer_students import build_transformer_student
from o2mkd_ray.errors import ConfigError

UNEVEN = [0, 300, 600, 1000]  # DiT, 4 steps: DDIM 750/500/250/0 and DPM 800/600/400/200 visit all three
# SD3, 4 steps with shift 3: Euler t = 1000, 900, 750, 500; Heun 1000, 857.69, 602.15, 8.93 (each twice)
UNEVEN_SD3 = [0, 600, 800, 1000]
LABELS = [1, 2]
SD3_KW = {"prompt": ["a red cube", "two blue balls"], "negative_prompt": ["blurry", "dark"], "guidance_scale": 3.0,
          "max_sequence_length": 8}


@pytest.fixture(scope="module")
def dit(tiny_dit_dir):
    pipe = DiTPipeline.from_pretrained(tiny_dit_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3(tiny_sd3_dir):
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_scheduler(pipe, scheduler_cls):
    """diffusers' own pipeline on the teacher's modules with a fresh ``scheduler_cls`` on the teacher's config."""
    ref = type(pipe)(**{**pipe.components, "scheduler": scheduler_cls.from_config(pipe.scheduler.config)})
    ref.set_progress_bar_config(disable=True)
    return ref


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def dit_images(pipe, seed=0):
    return pipe(class_labels=LABELS, num_inference_steps=4, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images  # (B, 3, H, W)


def sd3_images(pipe, seed=0):
    return pipe(num_inference_steps=4, generator=torch.Generator().manual_seed(seed), output_type="pt",
                **SD3_KW).images  # (B, 3, H, W)


def perturbed(model, seed, scale=0.05):
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return other


def smaller_students(teacher):
    """Three students of three shapes: half width, half depth, and a perturbed full-size copy."""
    return [build_transformer_student(teacher, width=0.5), build_transformer_student(teacher, depth=0.5),
            perturbed(teacher, 2)]


def record_timesteps(students: MultiStudentTransformer) -> list[list[float]]:
    """Per student, the timesteps it was called with (one entry per call, its first element)."""
    calls = [[] for _ in range(students.num_students)]
    for k, s in enumerate(students.students):
        s.register_forward_pre_hook(lambda m, a, kw, k=k: calls[k].append(float(kw["timestep"].reshape(-1)[0])),
                                    with_kwargs=True)
    return calls


def assert_on_owners(calls: list[list[float]], boundaries: list[int]) -> None:
    """Every student ran, and only on timesteps of its own segment ``[b_k, b_k+1)`` (t = T: the last one)."""
    T, n = boundaries[-1], len(boundaries) - 1
    for k, ts in enumerate(calls):
        assert ts, f"student {k} never ran: {calls}"
        for t in ts:
            assert boundaries[k] <= t < boundaries[k + 1] or (t == T and k == n - 1), f"t={t} on student {k}: {calls}"


# ---------------------------------------------------------------------------------------------------- DiT


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_dit_one_student_equal_to_the_teacher_reproduces_dit_pipeline(dit, scheduler_cls):
    ref = with_scheduler(dit, scheduler_cls)
    students = MultiStudentTransformer([copy.deepcopy(dit.transformer)], boundaries=[0, 1000])
    pipe = quiet(O2MKDDiTPipeline.from_teacher(dit, students, scheduler_cls.from_config(dit.scheduler.config)))
    assert torch.equal(dit_images(pipe), dit_images(ref))
    assert pipe.vae is dit.vae and pipe.labels == dit.labels


def test_dit_three_copies_at_uneven_boundaries_from_a_folder(dit, tiny_dit_dir):
    students = MultiStudentTransformer([copy.deepcopy(dit.transformer) for _ in range(3)], boundaries=UNEVEN)
    calls = record_timesteps(students)
    pipe = quiet(O2MKDDiTPipeline.from_teacher(tiny_dit_dir, students))
    assert torch.equal(dit_images(pipe), dit_images(dit))
    assert calls == [[250.0, 0.0], [500.0], [750.0]]  # every student ran, each on its own segment's steps


def test_dit_each_step_runs_on_its_owner(dit):
    """Different students: each step's timestep reaches the student whose segment holds it, and the images differ
    from the teacher's (the students are really used)."""
    students = MultiStudentTransformer([perturbed(dit.transformer, k) for k in range(3)], boundaries=UNEVEN)
    calls = record_timesteps(students)
    pipe = quiet(O2MKDDiTPipeline.from_teacher(dit, students, DPMSolverMultistepScheduler.from_config(
        dit.scheduler.config)))
    images = dit_images(pipe)
    assert_on_owners(calls, UNEVEN)
    assert not torch.equal(images, dit_images(with_scheduler(dit, DPMSolverMultistepScheduler)))


def test_dit_save_and_load_round_trip(dit, tmp_path):
    students = MultiStudentTransformer(smaller_students(dit.transformer), boundaries=UNEVEN)
    pipe = quiet(O2MKDDiTPipeline.from_teacher(dit, students))
    pipe.save_pretrained(tmp_path / "o2mkd-dit")
    loaded = quiet(O2MKDDiTPipeline.from_pretrained(tmp_path / "o2mkd-dit"))
    assert isinstance(loaded.transformer, MultiStudentTransformer)
    assert loaded.transformer.config.boundaries == UNEVEN and loaded.labels == dit.labels
    assert [s.config.num_attention_heads for s in loaded.transformer.students] == [2, 4, 4]
    assert [s.config.num_layers for s in loaded.transformer.students] == [4, 2, 4]
    assert torch.equal(dit_images(loaded), dit_images(pipe))


def test_dit_from_a_folder_that_is_not_dit(tmp_path):
    with pytest.raises(ConfigError, match="not a DiT folder"):
        O2MKDDiTPipeline.from_teacher(tmp_path, MultiStudentTransformer([_tiny_dit()], boundaries=[0, 1000]))


def _tiny_dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8,
                                 num_layers=1, sample_size=4, patch_size=2)


# ---------------------------------------------------------------------------------------------------- SD3


@pytest.mark.parametrize("scheduler_cls", [FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler])
def test_sd3_one_student_equal_to_the_teacher_reproduces_sd3_pipeline(sd3, scheduler_cls):
    ref = with_scheduler(sd3, scheduler_cls)
    students = MultiStudentTransformer([copy.deepcopy(sd3.transformer)], boundaries=[0, 1000])
    pipe = quiet(O2MKDStableDiffusion3Pipeline.from_teacher(sd3, students,
                                                            scheduler_cls.from_config(sd3.scheduler.config)))
    assert torch.equal(sd3_images(pipe), sd3_images(ref))
    assert pipe.text_encoder_2 is sd3.text_encoder_2 and pipe.text_encoder_3 is None


@pytest.mark.parametrize("scheduler_cls", [FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler])
def test_sd3_three_copies_at_uneven_boundaries_route_float_timesteps(sd3, tiny_sd3_dir, scheduler_cls):
    students = MultiStudentTransformer([copy.deepcopy(sd3.transformer) for _ in range(3)], boundaries=UNEVEN_SD3)
    calls = record_timesteps(students)
    pipe = quiet(O2MKDStableDiffusion3Pipeline.from_teacher(tiny_sd3_dir, students,
                                                            scheduler_cls.from_config(sd3.scheduler.config)))
    assert torch.equal(sd3_images(pipe), sd3_images(with_scheduler(sd3, scheduler_cls)))
    assert_on_owners(calls, UNEVEN_SD3)
    if scheduler_cls is FlowMatchHeunDiscreteScheduler:  # 602.15 sits just above the boundary at 600
        assert calls[1] == pytest.approx([602.1506] * 2, abs=1e-3)


def test_sd3_different_students_are_used_and_round_trip(sd3, tmp_path):
    students = MultiStudentTransformer(smaller_students(sd3.transformer), boundaries=UNEVEN_SD3)
    pipe = quiet(O2MKDStableDiffusion3Pipeline.from_teacher(sd3, students))
    images = sd3_images(pipe)
    assert not torch.equal(images, sd3_images(sd3))
    pipe.save_pretrained(tmp_path / "o2mkd-sd3")
    loaded = quiet(O2MKDStableDiffusion3Pipeline.from_pretrained(tmp_path / "o2mkd-sd3"))
    assert isinstance(loaded.transformer, MultiStudentTransformer) and loaded.text_encoder_3 is None
    assert loaded.transformer.config.boundaries == UNEVEN_SD3
    assert [s.config.caption_projection_dim for s in loaded.transformer.students] == [16, 32, 32]
    assert torch.equal(sd3_images(loaded), images)


# ---------------------------------------------------------------------------------------------------- per element


def assert_rows_from_owners(students, out, owners, rows_call):
    """Each row of ``out`` equals what its expected owner gives on the rows it owns (the same sub-batch, so
    bit-exact) and differs from what the other students give."""
    for k in range(students.num_students):
        idx = torch.tensor([i for i, o in enumerate(owners) if o == k])
        assert len(idx), f"no row for student {k}"
        assert torch.equal(out[idx], rows_call(students.student(k), idx)), f"rows {idx.tolist()} not from {k}"
        other = rows_call(students.student((k + 1) % students.num_students), idx)
        assert not torch.allclose(out[idx], other, atol=1e-3)


def test_mixed_float_timesteps_route_each_element_to_its_owner_dit(dit):
    students = MultiStudentTransformer([perturbed(dit.transformer, k, scale=0.2) for k in range(3)],
                                       boundaries=UNEVEN)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([900.22, 299.5, 300.0, 600.0, 1000.0])  # on a boundary: the segment starting there; T: the last
    labels = torch.tensor([0, 1, 2, 3, 1000])
    with torch.no_grad():
        out = students(x, timestep=t, class_labels=labels).sample  # (5, 8, 8, 8): learned sigma
        assert out.shape == (5, 8, 8, 8)
        assert_rows_from_owners(students, out, [2, 0, 1, 2, 2], lambda m, idx: m(
            x[idx], timestep=t[idx], class_labels=labels[idx]).sample)


def test_mixed_float_timesteps_route_each_element_to_its_owner_sd3(sd3):
    students = MultiStudentTransformer([perturbed(sd3.transformer, k, scale=0.2) for k in range(3)],
                                       boundaries=UNEVEN_SD3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, 8, 8, generator=g)
    text = torch.randn(4, 5, 48, generator=g)  # (B, L, joint_attention_dim)
    pooled = torch.randn(4, 32, generator=g)  # (B, pooled_projection_dim)
    t = torch.tensor([900.22, 599.99, 600.0, 0.5])
    with torch.no_grad():
        # SD3Transformer2DModel.forward's positional order: (hidden_states, encoder_hidden_states, pooled_projections)
        out = students(x, text, pooled, timestep=t, return_dict=False)[0]
        assert out.shape == x.shape
        assert_rows_from_owners(students, out, [2, 0, 1, 0], lambda m, idx: m(
            x[idx], encoder_hidden_states=text[idx], pooled_projections=pooled[idx], timestep=t[idx]).sample)
