"""Compatibility module: keeps the old import path ``o2mkd_ray.multi_unet`` working.

Pipeline folders and MLflow models saved before the package was layered record this path (``model_index.json``
names ``["o2mkd_ray.multi_unet", "MultiStudentUNet"]``); it must keep importing, or those saves stop loading. New saves record
``o2mkd_ray.pipelines.multi_unet``. Nothing else belongs here.
"""

# diffusers resolves a component's loader by looking up its base classes (ModelMixin, ...) in this module
from diffusers import ModelMixin  # noqa: F401

from o2mkd_ray.pipelines.multi_unet import MultiStudentUNet

__all__ = ["MultiStudentUNet"]
