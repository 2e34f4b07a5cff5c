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
    :func:`read_captions` reads them; ``o2mkd_ray.sd`` turns them into cached text embeddings and VAE latents.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .config import ConfigError, DataConfig

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
PROMPT_SUFFIXES = {".txt", ".csv", ".parquet", ".json"}


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
    elif d.kind == "hf" or (d.kind == "prompts" and not d.path):
        if d.kind == "prompts" and not d.name:
            raise ConfigError("data.path: data.kind=prompts needs a prompts file (data.path: .txt/.csv/.parquet/COCO "
                              ".json) or an HF dataset of captions (data.name)")
        if importlib.util.find_spec("datasets") is None:
            warns.append(f"data.kind={d.kind}: the 'datasets' package is not installed; pip install datasets")
    elif d.kind == "prompts":
        _check_prompts_file(d)
    if warns and strict:
        raise ConfigError(warns[0])
    return warns


def _check_prompts_file(d: DataConfig) -> None:
    """The prompts file exists, has a known format and the caption column; a given image_root exists."""
    path = Path(d.path)
    if not path.is_file():
        raise ConfigError(f"data.path: prompts file {str(path)!r} does not exist; give a .txt (one prompt per line), "
                          ".csv/.parquet (column data.caption_key) or COCO captions .json")
    if path.suffix.lower() not in PROMPT_SUFFIXES:
        raise ConfigError(f"data.path: {str(path)!r} has an unknown prompts format; use "
                          f"{', '.join(sorted(PROMPT_SUFFIXES))}")
    if d.image_root is not None and not Path(d.image_root).is_dir():
        raise ConfigError(f"data.image_root: folder {d.image_root!r} does not exist; point it at the images the "
                          "prompts file names (or remove it to distil from prompts only)")
    if path.suffix.lower() in (".csv", ".parquet"):
        cols = _table_columns(path)
        if d.caption_key not in cols:
            raise ConfigError(f"data.caption_key: column {d.caption_key!r} not in {str(path)!r} (columns: "
                              f"{', '.join(map(str, cols))}); set data.caption_key")
    df = read_captions(d)
    if df.empty:
        raise ConfigError(f"data.path: {str(path)!r} holds no prompts; add captions or fix the file")
    if "image" in df and isinstance(df["image"].iloc[0], str):
        first = Path(df["image"].iloc[0])
        if not first.is_file():
            raise ConfigError(f"data.image_root: image {str(first)!r} named by {str(path)!r} does not exist; fix "
                              "data.image_root")
        _check_image(first)


def _table_columns(path: Path) -> list[str]:
    import pandas as pd

    try:
        if path.suffix.lower() == ".csv":
            return list(pd.read_csv(path, nrows=0).columns)
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's file
        raise ConfigError(f"data.path: cannot read {str(path)!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                          "fix or re-export the file") from None


def read_captions(d: DataConfig):
    """Captions (and optional images) of a ``prompts`` data config.

    Returns:
        A pandas DataFrame with a ``caption`` column (str) and, when images are available, an ``image`` column
        (a file path, or a PIL image for HF datasets); the first ``data.max_prompts`` rows.
    """
    import pandas as pd

    n = d.max_prompts
    if d.path:
        path = Path(d.path)
        root = Path(d.image_root) if d.image_root else None
        suffix = path.suffix.lower()
        if suffix == ".txt":
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            df = pd.DataFrame({"caption": [ln for ln in lines if ln]})
        elif suffix in (".csv", ".parquet"):
            raw = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
            if d.caption_key not in raw:
                raise ConfigError(f"data.caption_key: column {d.caption_key!r} not in {str(path)!r}; set data.caption_key")
            df = pd.DataFrame({"caption": raw[d.caption_key].astype(str)})
            if d.image_key in raw:
                base = root or path.parent
                df["image"] = [str(base / p) for p in raw[d.image_key].astype(str)]
        elif suffix == ".json":
            df = _coco_captions(path, root)
        else:
            raise ConfigError(f"data.path: {str(path)!r} has an unknown prompts format; use "
                              f"{', '.join(sorted(PROMPT_SUFFIXES))}")
    else:
        import datasets as hfd

        base = hfd.load_dataset(d.name, split=d.split, cache_dir=None)
        if n is not None:
            base = base.select(range(min(n, len(base))))
        caps = base[d.caption_key]
        df = pd.DataFrame({"caption": [c[0] if isinstance(c, (list, tuple)) else str(c) for c in caps]})
        if d.image_key in base.column_names:
            df["image"] = list(base[d.image_key])
    df["caption"] = df["caption"].astype(str)  # an empty frame's column is float: make it str for .str
    df = df[df["caption"].str.strip() != ""].reset_index(drop=True)
    return df.head(n) if n is not None else df


def _coco_captions(path: Path, root: Path | None):
    """COCO captions JSON (``{"images": [{id, file_name}], "annotations": [{image_id, caption}]}``): one row per
    caption, in file order; images only when ``root`` is given."""
    import pandas as pd

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ann = data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise ConfigError(f"data.path: {str(path)!r} is not a COCO captions file (expected 'annotations' with "
                          "'caption' fields); use a .txt/.csv/.parquet of prompts instead") from None
    df = pd.DataFrame({"caption": [str(a.get("caption", "")).strip() for a in ann]})
    if root is not None:
        files = {im["id"]: im["file_name"] for im in data.get("images", [])}
        df["image"] = [str(root / files[a["image_id"]]) if a.get("image_id") in files else None for a in ann]
        if df["image"].isna().any():
            raise ConfigError(f"data.path: some captions in {str(path)!r} name an image_id missing from 'images'; "
                              "use the matching captions file")
    return df


def load_caption_image(item, resolution: int) -> torch.Tensor:
    """An image (path or PIL) as ``(3, H, W)`` in [-1, 1] at ``resolution`` (the VAE's input range)."""
    from PIL import Image

    if isinstance(item, (str, Path)):
        with Image.open(item) as im:
            return _pil_to_x0(im, resolution, 3, (-1.0, 1.0))
    return _pil_to_x0(item, resolution, 3, (-1.0, 1.0))


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
    if d.kind == "prompts":
        raise ConfigError("data.kind=prompts: prompt datasets are built from the teacher's text encoder and VAE "
                          "(o2mkd_ray.sd.build_cond_data), which needs a Stable Diffusion teacher")
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
