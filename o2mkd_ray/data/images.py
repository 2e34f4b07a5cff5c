"""Datasets of ``x_0`` images as tensors ``(C, H, W)`` in ``data.value_range``.

Kinds:
  * ``digits`` (embedded default): scikit-learn's bundled 8×8 handwritten digits (1,797 images, shipped inside the
    scikit-learn wheel, which mlflow already depends on, so nothing is downloaded), upsampled bilinearly to
    ``data.resolution``. Real handwriting, tiny, and recognisable at 16×16 — enough to see distillation work on a
    laptop CPU in minutes.
  * ``image_folder``: any tree of PNG/JPEG files under ``data.path``.
  * ``torchvision``: a torchvision dataset class by name (``CIFAR10``, ``MNIST``, ...) rooted at ``data.path``.
  * ``hf``: a Hugging Face dataset by name (``datasets`` must be installed), column ``data.image_key``.
  * ``prompts`` (Stable Diffusion teachers): captions from a text file (one per line), a CSV/parquet column
    (``data.caption_key``), a COCO captions JSON (``captions_train2014.json``), or an HF dataset (``data.name``);
    optionally with images (a path column / COCO ``file_name`` under ``data.image_root``, or an HF image column).
    :func:`read_captions` reads them; ``o2mkd_ray.core.sd`` turns them into cached text embeddings and VAE latents.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from o2mkd_ray.errors import ConfigError

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


def pil_to_x0(im, resolution: int, channels: int, value_range) -> torch.Tensor:
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
            return (pil_to_x0(im, self.resolution, self.channels, self.value_range),)


class WrappedDataset(Dataset):
    """Adapts a torchvision / HF dataset yielding PIL images (or (PIL, label)) to our tensor format."""

    def __init__(self, base, resolution: int, channels: int, value_range, key: str | None = None):
        self.base, self.key = base, key
        self.resolution, self.channels, self.value_range = resolution, channels, list(value_range)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        im = item[self.key] if self.key is not None else (item[0] if isinstance(item, (tuple, list)) else item)
        return (pil_to_x0(im, self.resolution, self.channels, self.value_range),)


def check_image(path: Path) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()  # reads the header and checks the file's structure, no decode of the pixels
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ConfigError(f"data.path: {str(path)!r} is not a readable image ({type(e).__name__}); remove or "
                          "replace it") from None




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
