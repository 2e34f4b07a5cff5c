"""Compatibility module: keeps the old import path ``o2mkd_ray.pipeline`` working.

Pipeline folders and MLflow models saved before the package was layered record this path (``model_index.json``
names ``["o2mkd_ray.pipeline", "O2MKDPipeline"]``); it must keep importing, or those saves stop loading. New saves record
``o2mkd_ray.pipelines.unconditional``. Nothing else belongs here.
"""

from o2mkd_ray.pipelines.unconditional import O2MKDPipeline

__all__ = ["O2MKDPipeline"]
