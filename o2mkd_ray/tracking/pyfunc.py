"""The exported pipeline as an MLflow pyfunc model ("models from code", no pickled objects).

:func:`save_pipeline_model` writes a self-contained model folder; :class:`PipelineModel` is the wrapper that
MLflow loads (the saved entry point imports it from this module). :mod:`o2mkd_ray.tracking.tracker` logs it to a run
and re-exports these names.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
import warnings
from pathlib import Path

import mlflow
import pandas as pd


class PipelineModel(mlflow.pyfunc.PythonModel):
    """``mlflow.pyfunc`` wrapper of :class:`~o2mkd_ray.O2MKDPipeline` (or a text-to-image O2MKD pipeline:
    ``O2MKDStableDiffusionPipeline``, ``O2MKDStableDiffusionXLPipeline``; or the class-conditional
    ``O2MKDDiTPipeline``).

    ``predict`` takes a DataFrame (first row) or a dict with ``num_images`` (default 4), ``steps`` (default 50),
    ``seed`` (default 0), for text-to-image pipelines ``prompt`` (required), ``negative_prompt`` and
    ``guidance_scale`` (default 7.5), for DiT ``class_label`` (required) and ``guidance_scale`` (default 4.0, as
    ``DiTPipeline``); it returns images as a float32 array of shape (B, H, W, C) in [0, 1].
    """

    def load_context(self, context):
        import json
        from pathlib import Path

        path = context.artifacts["pipeline"]
        cls = json.loads((Path(path) / "model_index.json").read_text())["_class_name"]
        self.classes = cls == "O2MKDDiTPipeline"
        self.text = cls not in ("O2MKDPipeline", "O2MKDDiTPipeline")
        from o2mkd_ray.pipelines.build import saved_pipeline_class

        self.pipe = saved_pipeline_class(path).from_pretrained(path)
        self.pipe.set_progress_bar_config(disable=True)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):  # (B, H, W, C)
        import numpy as np
        import torch

        args = dict(params or {})
        if isinstance(model_input, pd.DataFrame):  # first row; MLflow turns a dict input into one
            rows = model_input.to_dict(orient="records")
            args.update({k: v for k, v in (rows[0] if rows else {}).items() if v is not None and v == v})  # no NaN
        elif isinstance(model_input, dict):
            args.update({k: (v[0] if isinstance(v, (list, tuple)) and v else v) for k, v in model_input.items()})
        n, steps, seed = (int(args.get("num_images", 4)), int(args.get("steps", 50)), int(args.get("seed", 0)))
        g = torch.Generator().manual_seed(seed)
        if self.classes:
            if args.get("class_label") is None:
                raise ValueError("this is a class-conditional (DiT) model: give a 'class_label'")
            images = self.pipe(class_labels=[int(args["class_label"])] * n, num_inference_steps=steps, generator=g,
                               guidance_scale=float(args.get("guidance_scale", 4.0)), output_type="np").images
        elif self.text:
            if not args.get("prompt"):
                raise ValueError("this is a text-to-image model: give a 'prompt'")
            images = self.pipe(str(args["prompt"]), negative_prompt=args.get("negative_prompt"), num_images_per_prompt=n,
                               guidance_scale=float(args.get("guidance_scale", 7.5)), num_inference_steps=steps,
                               generator=g, output_type="np").images
        else:
            images = self.pipe(batch_size=n, num_inference_steps=steps, generator=g, output_type="np").images
        return np.asarray(images, dtype=np.float32)  # (B, H, W, C)


def _pip_requirements() -> list[str]:
    # pinned from this environment, no resolution over the network; local tags (+cpu) are not on PyPI
    reqs = []
    for dist in ("torch", "diffusers", "numpy", "pandas", "safetensors", "accelerate", "transformers"):
        try:
            reqs.append(f"{dist}=={importlib.metadata.version(dist).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            if dist in ("torch", "diffusers", "numpy"):
                reqs.append(dist)
    return reqs


_MODEL_CODE = """\
# MLflow "models from code" entry point (no pickled objects): the pyfunc wrapper of O2MKDPipeline
import mlflow
from o2mkd_ray.tracking.pyfunc import PipelineModel

mlflow.models.set_model(PipelineModel())
"""


def _signature():
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    inputs = Schema([ColSpec("long", name, required=False) for name in ("num_images", "steps", "seed", "class_label")]
                    + [ColSpec("string", name, required=False) for name in ("prompt", "negative_prompt")]
                    + [ColSpec("double", "guidance_scale", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype("float32"), (-1, -1, -1, -1))]))


def save_pipeline_model(pipeline_dir: str | Path, path: str | Path, mlflow_model=None) -> Path:
    """Saves ``pipeline_dir`` as a self-contained MLflow pyfunc model folder at ``path`` (no tracking calls).

    The model is "code, not pickle" (MLflow's models from code); the ``o2mkd_ray`` package goes in as
    ``code_paths``, so loading needs torch and diffusers but not this package installed; requirements are pinned
    from this environment, so nothing is resolved over the network.
    """
    from o2mkd_ray.tracking.http_env import scoped_env

    pkg = Path(__file__).resolve().parent.parent  # the o2mkd_ray package folder
    with tempfile.TemporaryDirectory(prefix="o2mkd-code-") as tmp, scoped_env(), warnings.catch_warnings():
        # an input example would make MLflow run the pipeline once while saving: too slow for large pipelines
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        code = Path(tmp) / pkg.name
        shutil.copytree(pkg, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "assets"))
        entry = Path(tmp) / "o2mkd_pipeline_model.py"
        entry.write_text(_MODEL_CODE)
        mlflow.pyfunc.save_model(
            path=str(path), python_model=str(entry), artifacts={"pipeline": str(pipeline_dir)},
            code_paths=[str(code)], pip_requirements=_pip_requirements(), signature=_signature(),
            mlflow_model=mlflow_model,
        )
    return Path(path)
