"""What the text-to-image O2MKD pipelines share around diffusers' denoising loop: per-segment step budgets, the
check that the students' boundaries span the scheduler's timesteps, and fresh scheduler copies."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

from diffusers.schedulers.scheduling_utils import SchedulerMixin

from o2mkd_ray.pipelines.unconditional import segment_timesteps


def accepts(fn, name: str) -> bool:
    """True when callable ``fn`` takes a parameter called ``name``."""
    return name in inspect.signature(fn).parameters


def fresh(scheduler: SchedulerMixin) -> SchedulerMixin:
    """A copy of the scheduler (no shared ``set_timesteps`` state). Not ``from_config(scheduler.config)``: keys
    that the pipelines' ``__init__`` normalised are listed in ``_use_default_values`` and from_config would
    quietly restore the class defaults (e.g. DDIM's ``clip_sample=True``)."""
    return copy.deepcopy(scheduler)


def load_teacher_parts(pipeline_cls, path: str | Path, components: tuple[str, ...], family: str,
                       denoiser: str = "unet", **kwargs):
    """A teacher's diffusers pipeline folder loaded without its denoiser (the students replace it), for
    ``from_teacher`` of the O2MKD pipelines.

    Args:
        pipeline_cls: the teacher's diffusers pipeline class (``StableDiffusionPipeline``, ...).
        components: the sub-folders the folder must hold.
        family: the model family's name in messages (``Stable Diffusion``, ``Stable Diffusion XL``).
        denoiser: the component the students replace, not loaded (``unet``; ``transformer`` for DiT and SD3).
        kwargs: passed to ``from_pretrained`` (e.g. no safety checker, no watermarker).
    Raises:
        ConfigError: a missing component or ``model_index.json``, or a folder diffusers cannot load (one line).
    """
    from o2mkd_ray.errors import ConfigError

    p = Path(path).expanduser()
    missing = [c + "/" for c in components if not (p / c).is_dir()]
    if not (p / "model_index.json").is_file():
        missing.append("model_index.json")
    if missing:
        raise ConfigError(f"teacher: {str(p)!r} is not a {family} folder (missing {', '.join(missing)}); save one "
                          f"with {pipeline_cls.__name__}.save_pretrained")
    try:
        return pipeline_cls.from_pretrained(p, **{denoiser: None}, **kwargs)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"teacher: could not load the {family} folder {str(p)!r}: {first}") from None


class SegmentSteps:
    """Mixin for pipelines whose ``students_component`` (``unet``; ``transformer`` in the DiT and SD3 pipelines) is a
    multi-student model with ``config.boundaries`` and that have a ``scheduler``."""

    students_component = "unet"

    @property
    def _boundaries(self) -> list:
        return getattr(self, self.students_component).config.boundaries

    def _segment_timesteps(self, steps_per_segment) -> list[int]:
        """The custom timesteps giving segment k ``steps_per_segment[k]`` steps; ValueError when the scheduler
        cannot take custom timesteps."""
        timesteps = segment_timesteps(self._boundaries, steps_per_segment)
        sched = type(self.scheduler)
        if not accepts(self.scheduler.set_timesteps, "timesteps"):
            raise ValueError(
                "steps_per_segment needs a scheduler whose set_timesteps accepts custom `timesteps`, such as"
                f" DDPMScheduler or DPMSolverMultistepScheduler; {sched.__name__} does not. Swap it with"
                " pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)"
            )
        return timesteps

    def _check_timestep_range(self) -> None:
        """ValueError unless the students' boundaries end at the scheduler's ``num_train_timesteps``."""
        T = self.scheduler.config.get("num_train_timesteps")
        end = self._boundaries[-1]
        if T is not None and int(T) != int(end):
            raise ValueError(
                f"{type(self).__name__}: the students' boundaries end at {end} but the scheduler "
                f"({type(self.scheduler).__name__}) has num_train_timesteps={T}; they must match"
            )
