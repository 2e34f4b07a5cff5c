"""Datasets of ``x_0`` images as tensors ``(C, H, W)`` in ``data.value_range``.

Kinds:
  * ``digits`` (embedded default): scikit-learn's bundled 8×8 handwritten digits (1,797 images, shipped inside the
    scikit-learn wheel, which mlflow already depends on, so nothing is downloaded), upsampled bilinearly to
    ``data.resolution``. Real handwriting, tiny, and recognisable at 16×16 — enough to see distillation work on a
    laptop CPU in minutes.
  * ``image_folder``: any tree of PNG/JPEG files under ``data.path``.
  * ``torchvision``: a torchvision dataset class by name (``CIFAR10``, ``MNIST``, ...) rooted at ``data.path``.
  * ``hf``: a Hugging Face dataset by name (``datasets`` must be installed), column ``data.image_key``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .config import ConfigError, DataConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _to_range(x01: torch.Tensor, value_range: list[float]) -> torch.Tensor:
    lo, hi = value_range
    return x01 * (hi - lo) + lo


def _resize(x: torch.Tensor, resolution: int) -> torch.Tensor:
    # x: (B, C, H, W) in [0, 1]
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False).clamp(0, 1)


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, channels, -1, -1).contiguous()
    if channels == 1:
        return x[:, :3].mean(dim=1, keepdim=True)
    return x[:, :channels]


def _pil_to_x0(im, resolution: int, channels: int, value_range) -> torch.Tensor:
    """A PIL image → ``(C, H, W)`` float tensor at ``resolution`` in ``value_range``."""
    arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(arr)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # (C, H, W)
    return _to_range(_match_channels(_resize(x[None], resolution), channels)[0], list(value_range))


def digits_dataset(resolution: int = 16, channels: int = 1, value_range=(-1.0, 1.0)) -> TensorDataset:
    """scikit-learn's bundled digits, upsampled. Returns a TensorDataset of ``(C, H, W)`` float tensors."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    x = torch.from_numpy(images)[:, None]  # (N, 1, 8, 8)
    x = _match_channels(_resize(x, resolution), channels)
    return TensorDataset(_to_range(x, list(value_range)))


class ImageFolder(Dataset):
    """Every PNG/JPEG under ``root`` (recursively), resized to ``resolution``, mapped to ``value_range``."""

    def __init__(self, root: str | Path, resolution: int, channels: int, value_range):
        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        self.resolution, self.channels, self.value_range = resolution, channels, list(value_range)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return (_pil_to_x0(im, self.resolution, self.channels, self.value_range),)


class _Wrapped(Dataset):
    """Adapts a torchvision / HF dataset yielding PIL images (or (PIL, label)) to our tensor format."""

    def __init__(self, base, resolution: int, channels: int, value_range, key: str | None = None):
        self.base, self.key = base, key
        self.resolution, self.channels, self.value_range = resolution, channels, list(value_range)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        im = item[self.key] if self.key is not None else (item[0] if isinstance(item, (tuple, list)) else item)
        return (_pil_to_x0(im, self.resolution, self.channels, self.value_range),)


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
        _check_image(first)
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
    elif d.kind == "hf":
        if importlib.util.find_spec("datasets") is None:
            warns.append("data.kind=hf: the 'datasets' package is not installed; pip install datasets")
    if warns and strict:
        raise ConfigError(warns[0])
    return warns


def _check_image(path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()  # reads the header and checks the file's structure, no decode of the pixels
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ConfigError(f"data.path: {str(path)!r} is not a readable image ({type(e).__name__}); remove or "
                          "replace it") from None


def build_dataset(d: DataConfig) -> Dataset:
    """Builds the dataset named by the config. Items are 1-tuples ``(x_0,)`` with ``x_0: (C, H, W)``."""
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
        return _Wrapped(base, d.resolution, d.channels, d.value_range)
    import datasets as hfd

    base = hfd.load_dataset(d.name, split=d.split, cache_dir=d.path)
    return _Wrapped(base, d.resolution, d.channels, d.value_range, key=d.image_key)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Horizontal flip of each image with probability 1/2. ``x: (B, C, H, W)``."""
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(-1), x)


def make_loader(dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0) -> torch.utils.data.DataLoader:
    """A shuffling, drop-last DataLoader seeded by ``seed`` (Ray's prepare_data_loader adds sharding per rank)."""
    g = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(dataset))
    return torch.utils.data.DataLoader(
        dataset, batch_size=bs, shuffle=True, drop_last=True, generator=g, num_workers=num_workers
    )


def infinite(loader):
    """Cycles a DataLoader forever, advancing the DistributedSampler epoch when there is one."""
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1
