"""The networks and pipelines ``bench_sampling.py`` times: teacher and students of one shape, each pipeline once per
acceleration mode, plus the MACs per step of the sampling run (random weights: only the timing matters).

Two kinds, each built by one function returning ``(pipes, cost, run)``:

  unconditional  google/ddpm-cifar10-32's UNet2DModel as teacher, O2MKDPipeline over it (one segment) against
                 O2MKDPipeline over N channel-sliced students (DDIM)
  t2i            an SD-1.x-like UNet2DConditionModel (scaled down: ``T2I_UNET``), diffusers' own
                 StableDiffusionPipeline as teacher against O2MKDStableDiffusionPipeline over N students sharing
                 its VAE, text encoder and tokenizer (DDIM, classifier-free guidance: each step a UNet batch of 2B)

``pipes`` maps ``(network, mode)`` to a pipeline, network ``teacher`` or ``students``, mode a key of
:data:`MODES`; ``run(pipe, batch, steps, seed)`` returns ``((wall, cpu) seconds, images)`` of one whole sampling
call, cpu being the process's CPU time (what a busy shared machine inflates least: time spent waiting for a core
is not in it).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path

# acceleration modes: accelerate() keyword arguments; the teacher gets the same as the students (fair ratio)
MODES = {
    "off": {},
    "channels_last": {"channels_last": True},
    "compile": {"compile": True},
    "both": {"compile": True, "channels_last": True},
    # inductor freezing (weights as constants of the graph, so that it may fold and pre-pack them)
    "frozen": {"compile": True, "compile_kwargs": {"options": {"freezing": True}}},
}

# google/ddpm-cifar10-32 unet/config.json (diffusers UNet2DModel, 35.7 M parameters); attention_head_dim is
# null there: one head per attention block
CIFAR10_DDPM_UNET = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "freq_shift": 1, "flip_sin_to_cos": False,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (128, 256, 256, 256), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 0, "act_fn": "silu", "attention_head_dim": None, "norm_num_groups": 32, "norm_eps": 1e-6,
    "add_attention": True,
}
# its scheduler_config.json: DDPM, 1000 steps, linear betas 1e-4..0.02, clip_sample true
CIFAR10_DDPM_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
                              "beta_schedule": "linear", "clip_sample": True}

# runwayml/stable-diffusion-v1-5 unet/config.json at a fifth of its channels (320, 640, 1280, 1280) and of its
# text width (768), 32x32 latents (256 px images) instead of 64x64: same blocks, 8 heads, 32 norm groups.
T2I_UNET = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (64, 128, 256, 256),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 160, "attention_head_dim": 8, "norm_num_groups": 32,
}
PROMPTS = ["a red bus on a street", "two dogs in the snow", "a bowl of fruit", "a man riding a horse"]


def widths_for(args) -> list[float]:
    widths = [float(w) for w in str(args.width).split(",")]
    if len(widths) == 1:
        widths *= args.n
    if len(widths) != args.n:
        raise SystemExit(f"--width: got {len(widths)} values for --n {args.n}; give one value or {args.n}")
    return widths


def _cost(teacher_macs: int, student_macs: list[int], owners: list[int], timesteps, teacher, students) -> dict:
    """MACs per step of the run: the owner of each timestep, averaged over the steps."""
    from o2mkd_ray.core.costs import count_params

    visited = statistics.fmean(student_macs[k] for k in owners)
    return {
        "teacher_macs": teacher_macs, "teacher_params": count_params(teacher),
        "student_macs": student_macs, "student_params": [count_params(s) for s in students],
        "student_configs": [list(s.config.block_out_channels) for s in students],
        "timesteps": [int(t) for t in timesteps], "owners": owners,
        "student_macs_per_step": visited, "macs_ratio": visited / teacher_macs,
    }


def _per_mode(modes, make) -> dict:
    """``make(mode, copy_nets)`` per mode; every mode but ``off`` gets its own copy of the networks (the memory
    layout is set on the modules themselves, compile wrappers on their MultiStudentUNet)."""
    return {mode: make(mode, mode != "off") for mode in modes}


def build_unconditional(args, modes: list[str]):
    """The google/ddpm-cifar10-32 teacher against width-``--width`` students, one pipeline per (network, mode)."""
    import torch
    from diffusers import DDIMScheduler, UNet2DModel

    from o2mkd_ray import MultiStudentUNet, O2MKDPipeline, Segments
    from o2mkd_ray.core.costs import count_macs
    from o2mkd_ray.core.students import build_student

    torch.manual_seed(args.seed)
    teacher = UNet2DModel(**CIFAR10_DDPM_UNET).eval()
    segments = Segments.uniform(num_train_timesteps=CIFAR10_DDPM_SCHEDULER["num_train_timesteps"], n=args.n)
    students = [build_student(teacher, width=w).eval() for w in widths_for(args)]
    whole = (0, segments.boundaries[-1])  # one segment: the teacher owns every timestep

    def make(mode, copy_nets):
        t_net, s_nets = copy.deepcopy((teacher, students)) if copy_nets else (teacher, students)
        out = {}
        for name, multi in (("teacher", MultiStudentUNet([t_net], boundaries=whole)),
                            ("students", MultiStudentUNet(s_nets, boundaries=segments.boundaries))):
            pipe = O2MKDPipeline(students=multi, scheduler=DDIMScheduler(**CIFAR10_DDPM_SCHEDULER))
            pipe.set_progress_bar_config(disable=True)
            out[name] = pipe.accelerate(**MODES[mode])
        return out

    pipes = {(name, mode): p for mode, d in _per_mode(modes, make).items() for name, p in d.items()}
    probe = DDIMScheduler(**CIFAR10_DDPM_SCHEDULER)
    probe.set_timesteps(args.steps)
    owners = [int(segments.owner(int(t))) for t in probe.timesteps]
    cost = _cost(count_macs(teacher), [count_macs(s) for s in students], owners, probe.timesteps, teacher, students)
    cost["shape"] = "google/ddpm-cifar10-32 UNet2DModel"

    def run(pipe, batch: int, steps: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        t0, c0 = time.perf_counter(), time.process_time()
        images = pipe(batch_size=batch, generator=g, num_inference_steps=steps, output_type="np").images
        return (time.perf_counter() - t0, time.process_time() - c0), images

    return pipes, cost, run


def build_t2i(args, modes: list[str]):
    """diffusers' StableDiffusionPipeline with an SD-like teacher UNet against O2MKDStableDiffusionPipeline over
    width-``--width`` students; VAE, text encoder and tokenizer shared (tiny, random, built locally)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from o2mkd_ray.core.costs import count_macs
    from o2mkd_ray.core.fixtures import make_tiny_sd
    from o2mkd_ray.core.segments import Segments
    from o2mkd_ray.core.students import build_student
    from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet
    from o2mkd_ray.pipelines.stable_diffusion import O2MKDStableDiffusionPipeline

    with tempfile.TemporaryDirectory() as tmp:  # text encoder, tokenizer, VAE; its tiny UNet is replaced
        base = make_tiny_sd(Path(tmp) / "sd", seed=args.seed, sample_size=T2I_UNET["sample_size"],
                            cross_attention_dim=T2I_UNET["cross_attention_dim"])
    torch.manual_seed(args.seed)
    teacher = UNet2DConditionModel(**T2I_UNET).eval()
    sched = DDIMScheduler.from_config(base.scheduler.config)
    segments = Segments.uniform(sched.config.num_train_timesteps, args.n)
    students = [build_student(teacher, width=w).eval() for w in widths_for(args)]
    parts = {"vae": base.vae.eval(), "text_encoder": base.text_encoder.eval(), "tokenizer": base.tokenizer}

    def make(mode, copy_nets):
        t_net, s_nets = copy.deepcopy((teacher, students)) if copy_nets else (teacher, students)
        t_pipe = StableDiffusionPipeline(**parts, unet=t_net, scheduler=copy.deepcopy(sched), safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
        s_pipe = O2MKDStableDiffusionPipeline(**parts, unet=MultiStudentUNet(s_nets, segments.boundaries),
                                              scheduler=copy.deepcopy(sched))
        # the teacher gets the same options, the way a diffusers user applies them to a plain UNet
        if MODES[mode].get("channels_last"):
            t_pipe.unet.to(memory_format=torch.channels_last)
        if MODES[mode].get("compile"):
            t_pipe.unet = torch.compile(t_pipe.unet, dynamic=False, **MODES[mode].get("compile_kwargs", {}))
        for p in (t_pipe, s_pipe):
            p.set_progress_bar_config(disable=True)
        return {"teacher": t_pipe, "students": s_pipe.accelerate(**MODES[mode])}

    pipes = {(name, mode): p for mode, d in _per_mode(modes, make).items() for name, p in d.items()}
    L = base.tokenizer.model_max_length
    probe = copy.deepcopy(sched)
    probe.set_timesteps(args.steps)
    owners = [int(segments.owner(int(t))) for t in probe.timesteps]
    cost = _cost(count_macs(teacher, seq_len=L), [count_macs(s, seq_len=L) for s in students], owners,
                 probe.timesteps, teacher, students)
    cost["shape"] = (f"SD-1.x-like UNet2DConditionModel {list(T2I_UNET['block_out_channels'])}, "
                     f"{T2I_UNET['sample_size']}x{T2I_UNET['sample_size']} latents, text {L}x"
                     f"{T2I_UNET['cross_attention_dim']}, guidance 7.5 (UNet batch 2B)")

    def run(pipe, batch: int, steps: int, seed: int):
        prompts = (PROMPTS * batch)[:batch]
        g = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
        t0, c0 = time.perf_counter(), time.process_time()
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=7.5, generator=g,
                      output_type="latent").images
        return (time.perf_counter() - t0, time.process_time() - c0), images.float().numpy()

    return pipes, cost, run
