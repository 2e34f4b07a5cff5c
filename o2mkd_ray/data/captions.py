"""Caption sources for text-to-image teachers: text, CSV/parquet, COCO captions JSON, HF datasets.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from o2mkd_ray.config.schema import DataConfig
from o2mkd_ray.data.images import check_image, pil_to_x0
from o2mkd_ray.errors import ConfigError

PROMPT_SUFFIXES = {".txt", ".csv", ".parquet", ".json"}


def check_prompts_file(d: DataConfig) -> None:
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
        check_image(first)


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
            return pil_to_x0(im, resolution, 3, (-1.0, 1.0))
    return pil_to_x0(item, resolution, 3, (-1.0, 1.0))
