"""The dataset a config names: its pre-flight check (folders, files, optional packages) and the build."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from torch.utils.data import Dataset

from o2mkd_ray.config.schema import DataConfig
from o2mkd_ray.data.captions import check_prompts_file
from o2mkd_ray.data.images import IMAGE_SUFFIXES, ImageFolder, WrappedDataset, check_image, digits_dataset
from o2mkd_ray.errors import ConfigError


def check_data(d: DataConfig, strict: bool = True) -> list[str]:
    """Cheap checks of the data source (paths, installed packages) before any Ray work. Raises ConfigError.

    Args:
        strict: False (``--dry-run``) turns a missing optional package into a returned warning, since the run
            may be meant for another machine (e.g. torchvision on a GPU cluster).
    Returns:
        Warnings (only when not strict).
    """
    warns: list[str] = []
    if d.kind == "image_folder":
        root = Path(d.path or "")
        if not root.is_dir():
            raise ConfigError(f"data.path: folder {str(root)!r} does not exist; point it at a folder of PNG/JPEG images")
        first = next((p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES), None)
        if first is None:
            raise ConfigError(f"data.path: folder {str(root)!r} holds no PNG/JPEG images; add images or fix the path")
        check_image(first)
    elif d.kind == "torchvision":
        if importlib.util.find_spec("torchvision") is None:
            warns.append("data.kind=torchvision: torchvision is not installed; pip install 'o2mkd-ray[vision]'")
        else:
            import torchvision.datasets as tvd

            if not isinstance(getattr(tvd, d.name or "", None), type):
                raise ConfigError(f"data.name: torchvision has no dataset {d.name!r} (e.g. CIFAR10, MNIST, "
                                  "FashionMNIST)")
        if d.split not in ("train", "test"):
            raise ConfigError(f"data.split: torchvision datasets take 'train' or 'test', got {d.split!r}")
    elif d.kind == "hf" or (d.kind == "prompts" and not d.path):
        if d.kind == "prompts" and not d.name:
            raise ConfigError("data.path: data.kind=prompts needs a prompts file (data.path: .txt/.csv/.parquet/COCO "
                              ".json) or an HF dataset of captions (data.name)")
        if importlib.util.find_spec("datasets") is None:
            warns.append(f"data.kind={d.kind}: the 'datasets' package is not installed; pip install datasets")
    elif d.kind == "prompts":
        check_prompts_file(d)
    elif d.kind == "classes" and d.path:  # the class names are checked against the teacher's (check_run)
        root = Path(d.path).expanduser()
        if not root.is_dir() or not any(p.is_dir() for p in root.iterdir()):
            raise ConfigError(f"data.path: {str(root)!r} is not a folder of class subfolders; give a folder with "
                              "one subfolder of images per class")
    if warns and strict:
        raise ConfigError(warns[0])
    return warns


def build_dataset(d: DataConfig) -> Dataset:
    """Builds the dataset named by the config. Items are 1-tuples ``(x_0,)`` with ``x_0: (C, H, W)``."""
    if d.kind == "classes":
        raise ConfigError("data.kind=classes: class-labelled datasets are built with the teacher's VAE "
                          "(o2mkd_ray.data.class_data.build_class_data), which needs a DiT teacher")
    if d.kind == "prompts":
        raise ConfigError("data.kind=prompts: prompt datasets are built from the teacher's text encoder and VAE "
                          "(o2mkd_ray.data.cond_cache.build_cond_data), which needs a Stable Diffusion teacher")
    check_data(d)
    if d.kind == "digits":
        return digits_dataset(d.resolution, d.channels, d.value_range)
    if d.kind == "image_folder":
        return ImageFolder(d.path, d.resolution, d.channels, d.value_range)
    if d.kind == "torchvision":
        import torchvision.datasets as tvd

        cls = getattr(tvd, d.name, None)
        if cls is None:
            raise ConfigError(f"data.name: torchvision has no dataset {d.name!r} (e.g. CIFAR10, MNIST, FashionMNIST)")
        try:
            base = cls(root=d.path or "data", train=(d.split == "train"), download=d.download)
        except RuntimeError as e:
            raise ConfigError(
                f"data.path: {d.name} not found under {d.path!r} ({e}); download it there or set data.download=true"
            ) from None
        return WrappedDataset(base, d.resolution, d.channels, d.value_range)
    import datasets as hfd

    base = hfd.load_dataset(d.name, split=d.split, cache_dir=d.path)
    return WrappedDataset(base, d.resolution, d.channels, d.value_range, key=d.image_key)
