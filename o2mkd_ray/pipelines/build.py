"""From trained students to a diffusers pipeline: load a saved student, route students, share the teacher's parts.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.schedulers import make_scheduler
from o2mkd_ray.errors import ConfigError

STUDENT_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "SD3Transformer2DModel")


def load_student(checkpoint_dir: str | Path, use_ema: bool = True) -> nn.Module:
    """The (EMA) student saved in a segment checkpoint folder (a UNet2DModel, UNet2DConditionModel,
    DiTTransformer2DModel or SD3Transformer2DModel)."""
    import json

    import diffusers

    d = Path(checkpoint_dir) / ("ema" if use_ema else "student")
    cls = json.loads((d / "config.json").read_text()).get("_class_name", "UNet2DModel")
    if cls not in STUDENT_CLASSES:
        raise ConfigError(f"checkpoint {str(d)!r} holds a {cls}; expected one of {', '.join(STUDENT_CLASSES)}")
    return getattr(diffusers, cls).from_pretrained(d)


def load_saved_students(pipeline_dir: str | Path):
    """The :class:`MultiStudentUNet` (DiT: :class:`MultiStudentTransformer`) of a saved O2MKD pipeline folder,
    whatever the pipeline (its component is found by class in ``model_index.json``: ``students`` in the
    unconditional pipeline, ``unet`` in text-to-image ones, ``transformer`` in DiT's), without loading the other
    components.

    Raises:
        ConfigError: the folder has no ``model_index.json`` naming a MultiStudentUNet component.
    """
    import json

    from o2mkd_ray.pipelines.multi_transformer import MultiStudentTransformer
    from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet

    d = Path(pipeline_dir)
    index = json.loads((d / "model_index.json").read_text()) if (d / "model_index.json").is_file() else {}
    classes = {c.__name__: c for c in (MultiStudentUNet, MultiStudentTransformer)}
    found = [(k, v[1]) for k, v in index.items() if isinstance(v, (list, tuple)) and len(v) == 2
             and v[1] in classes]
    if len(found) != 1:
        raise ConfigError(f"pipeline folder {str(d)!r} has no MultiStudentUNet / MultiStudentTransformer component "
                          "in model_index.json; give OUT/pipeline of an o2mkd-ray distill run")
    return classes[found[0][1]].from_pretrained(d / found[0][0])


def build_pipeline(students: list[nn.Module], boundaries, scheduler, value_range):
    from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet
    from o2mkd_ray.pipelines.unconditional import O2MKDPipeline

    multi = MultiStudentUNet(students, boundaries=list(boundaries), value_range=tuple(value_range))
    return O2MKDPipeline(students=multi, scheduler=scheduler)


def teacher_sd_pipeline(cfg: Config, unet: nn.Module | None = None):
    """The text-to-image teacher as its diffusers pipeline (``StableDiffusionPipeline``,
    ``StableDiffusionXLPipeline`` for an SDXL teacher, ``StableDiffusion3Pipeline`` for SD3), its already loaded
    denoiser (UNet, SD3's transformer) reused when given."""
    from o2mkd_ray.core.teacher import teacher_kind

    kw = {"unet": unet} if unet is not None else {}
    if teacher_kind(cfg.teacher) == "sd3":
        from o2mkd_ray.core.sd3 import teacher_sd3_pipeline

        return teacher_sd3_pipeline(cfg.teacher.pretrained, unet)
    if teacher_kind(cfg.teacher) == "stable_diffusion_xl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(cfg.teacher.pretrained, **kw)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(cfg.teacher.pretrained, safety_checker=None,
                                                       requires_safety_checker=False, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sd_pipeline(students: list[nn.Module], boundaries, teacher_pipe, scheduler_name: str):
    """The O2MKD text-to-image pipeline of the teacher's family (``O2MKDStableDiffusionPipeline``,
    ``O2MKDStableDiffusionXLPipeline`` or ``O2MKDStableDiffusion3Pipeline``): the students routed by timestep (SD3:
    a :class:`MultiStudentTransformer` on the flow-matching time axis), the teacher's VAE/text encoder(s)/
    tokenizer(s), a sampling scheduler on the teacher's own scheduler config."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionXLPipeline

    from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet

    if isinstance(teacher_pipe, StableDiffusion3Pipeline):
        from o2mkd_ray.pipelines.multi_transformer import MultiStudentTransformer
        from o2mkd_ray.pipelines.stable_diffusion_3 import O2MKDStableDiffusion3Pipeline

        multi = MultiStudentTransformer(students, boundaries=list(boundaries))
        return O2MKDStableDiffusion3Pipeline.from_teacher(
            teacher_pipe, multi, scheduler=make_scheduler(scheduler_name, teacher_pipe.scheduler.config))

    multi = MultiStudentUNet(students, boundaries=list(boundaries))
    sampler = make_scheduler(scheduler_name, teacher_pipe.scheduler.config)
    cls = o2mkd_pipeline_class("O2MKDStableDiffusionXLPipeline" if isinstance(teacher_pipe, StableDiffusionXLPipeline)
                               else "O2MKDStableDiffusionPipeline")
    return cls.from_teacher(teacher_pipe, multi, scheduler=sampler)


def teacher_dit_pipeline(cfg: Config, transformer: nn.Module | None = None):
    """A DiT teacher as diffusers' ``DiTPipeline``, its already loaded transformer reused when given."""
    from diffusers import DiTPipeline

    kw = {"transformer": transformer} if transformer is not None else {}
    pipe = DiTPipeline.from_pretrained(cfg.teacher.pretrained, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_dit_pipeline(students: list[nn.Module], boundaries, teacher_pipe, scheduler_name: str):
    """``O2MKDDiTPipeline``: the DiT students routed by timestep, the teacher's VAE and class names, a sampling
    scheduler on the teacher's own scheduler config."""
    from o2mkd_ray.pipelines.dit import O2MKDDiTPipeline
    from o2mkd_ray.pipelines.multi_transformer import MultiStudentTransformer

    multi = MultiStudentTransformer(students, boundaries=list(boundaries))
    return O2MKDDiTPipeline.from_teacher(teacher_pipe, multi,
                                         scheduler=make_scheduler(scheduler_name, teacher_pipe.scheduler.config))


# model_index.json class name of a saved O2MKD pipeline -> (module, class); the text-to-image ones need the sd extra
PIPELINE_CLASSES = {
    "O2MKDPipeline": ("o2mkd_ray.pipelines.unconditional", "O2MKDPipeline"),
    "O2MKDStableDiffusionPipeline": ("o2mkd_ray.pipelines.stable_diffusion", "O2MKDStableDiffusionPipeline"),
    "O2MKDStableDiffusionXLPipeline": ("o2mkd_ray.pipelines.stable_diffusion_xl", "O2MKDStableDiffusionXLPipeline"),
    "O2MKDDiTPipeline": ("o2mkd_ray.pipelines.dit", "O2MKDDiTPipeline"),
    "O2MKDStableDiffusion3Pipeline": ("o2mkd_ray.pipelines.stable_diffusion_3", "O2MKDStableDiffusion3Pipeline"),
}


def o2mkd_pipeline_class(name: str):
    """The O2MKD pipeline class named ``name`` (a saved folder's ``model_index.json`` ``_class_name``), imported
    only when asked for (the text-to-image ones import transformers)."""
    import importlib

    if name not in PIPELINE_CLASSES:
        raise ConfigError(f"pipeline: {name!r} is not an O2MKD pipeline (expected one of {', '.join(PIPELINE_CLASSES)})")
    module, cls = PIPELINE_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def saved_pipeline_class(folder: str | Path):
    """The O2MKD pipeline class of a saved pipeline folder, from its ``model_index.json``."""
    import json

    return o2mkd_pipeline_class(json.loads((Path(folder) / "model_index.json").read_text())["_class_name"])
