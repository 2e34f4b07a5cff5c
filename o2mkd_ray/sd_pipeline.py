"""Compatibility module: keeps the old import path ``o2mkd_ray.sd_pipeline`` working.

Pipeline folders and MLflow models saved before the package was layered record this path (``model_index.json``
names ``["o2mkd_ray.sd_pipeline", "O2MKDStableDiffusionPipeline"]``); it must keep importing, or those saves stop loading. New saves record
``o2mkd_ray.pipelines.stable_diffusion``. Nothing else belongs here.
"""

from o2mkd_ray.pipelines.stable_diffusion import O2MKDStableDiffusionPipeline

__all__ = ["O2MKDStableDiffusionPipeline"]
