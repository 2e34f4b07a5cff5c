"""o2mkd-ray: one-to-many knowledge distillation (O2MKD) of diffusion models on Ray.

The package is layered; each layer imports only the layers below it (``import-linter`` contracts in
``pyproject.toml`` keep it so):

    cli → tune → engine → eval | tracking → distill → pipelines → data → core → config → errors

The public names below load lazily (module ``__getattr__``, PEP 562) so that ``import o2mkd_ray`` stays cheap:
the CLI and Ray workers that never sample do not pay for torch/diffusers imports here.
"""

import importlib

__version__ = "0.1.0"
_LAZY = {
    "Segments": "o2mkd_ray.core.segments",
    "MultiStudentUNet": "o2mkd_ray.pipelines.multi_unet",
    "MultiStudentTransformer": "o2mkd_ray.pipelines.multi_transformer",
    "O2MKDDiTPipeline": "o2mkd_ray.pipelines.dit",
    "O2MKDStableDiffusion3Pipeline": "o2mkd_ray.pipelines.stable_diffusion_3",
    "O2MKDPipeline": "o2mkd_ray.pipelines.unconditional",
    "O2MKDStableDiffusionPipeline": "o2mkd_ray.pipelines.stable_diffusion",
    "O2MKDStableDiffusionXLPipeline": "o2mkd_ray.pipelines.stable_diffusion_xl",
    "load_config": "o2mkd_ray.config.loading",
    "run_distillation": "o2mkd_ray.engine.driver",
    "evaluate_run": "o2mkd_ray.eval.evaluate",
    "evaluate_sd": "o2mkd_ray.eval.text_to_image",
    "clip_score": "o2mkd_ray.eval.clip",
}
__all__ = [
    "MultiStudentTransformer",
    "MultiStudentUNet",
    "O2MKDDiTPipeline",
    "O2MKDPipeline",
    "O2MKDStableDiffusion3Pipeline",
    "O2MKDStableDiffusionPipeline",
    "O2MKDStableDiffusionXLPipeline",
    "Segments",
    "__version__",
    "clip_score",
    "evaluate_run",
    "evaluate_sd",
    "load_config",
    "run_distillation",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'o2mkd_ray' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
