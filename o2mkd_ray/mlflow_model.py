"""Compatibility module: keeps the old import path ``o2mkd_ray.mlflow_model`` working.

Pipeline folders and MLflow models saved before the package was layered record this path (``model_index.json``
names ``["o2mkd_ray.mlflow_model", "PipelineModel"]``); it must keep importing, or those saves stop loading. New saves record
``o2mkd_ray.tracking.pyfunc``. Nothing else belongs here.
"""

from o2mkd_ray.tracking.pyfunc import PipelineModel

__all__ = ["PipelineModel"]
