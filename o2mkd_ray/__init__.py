"""o2mkd-ray: one-to-many knowledge distillation (O2MKD) of diffusion models on Ray.

The public names load lazily (module ``__getattr__``, PEP 562) so that ``import o2mkd_ray`` stays cheap:
the CLI and Ray workers that never sample do not pay for torch/diffusers imports here.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "Segments": "o2mkd_ray.segments",
    "MultiStudentUNet": "o2mkd_ray.multi_unet",
    "O2MKDPipeline": "o2mkd_ray.pipeline",
    "O2MKDStableDiffusionPipeline": "o2mkd_ray.sd_pipeline",
    "evaluate_sd": "o2mkd_ray.sd_eval",
    "clip_score": "o2mkd_ray.sd_eval",
}

__all__ = ["MultiStudentUNet", "O2MKDPipeline", "O2MKDStableDiffusionPipeline", "Segments", "clip_score",
           "evaluate_sd", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'o2mkd_ray' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
