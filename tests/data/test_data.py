"""Data: the embedded digits, an image folder, value ranges, random flip."""

import numpy as np
import pytest
import torch
from PIL import Image

from o2mkd_ray.config.schema import DataConfig
from o2mkd_ray.data.build import build_dataset
from o2mkd_ray.data.images import digits_dataset, make_loader, random_flip


def test_digits_default_shape_and_range():
    ds = digits_dataset(16, 1, (-1.0, 1.0))
    (x,) = ds[0]
    assert len(ds) == 1797 and x.shape == (1, 16, 16)
    allx = ds.tensors[0]
    assert allx.min() >= -1.0 and allx.max() <= 1.0 and allx.min() < -0.9 and allx.max() > 0.5


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (-0.5, 0.5), (0.0, 1.0)])
def test_image_folder_maps_pixels_to_value_range(tmp_path, value_range):
    sub = tmp_path / "imgs" / "nested"
    sub.mkdir(parents=True)
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(sub / "black.png")
    Image.fromarray(np.full((12, 12, 3), 255, np.uint8)).save(tmp_path / "imgs" / "white.jpg")
    ds = build_dataset(DataConfig(kind="image_folder", path=str(tmp_path / "imgs"), resolution=8, channels=3,
                                  value_range=list(value_range)))
    assert len(ds) == 2
    xs = {p.stem: ds[i][0] for i, p in enumerate(ds.files)}
    assert xs["black"].shape == (3, 8, 8)
    lo, hi = value_range
    assert torch.allclose(xs["black"], torch.full((3, 8, 8), lo))
    assert torch.allclose(xs["white"], torch.full((3, 8, 8), hi), atol=1e-5)


def test_image_folder_grey_to_one_channel(tmp_path):
    Image.fromarray(np.full((4, 4, 3), 128, np.uint8)).save(tmp_path / "g.png")
    (x,) = build_dataset(DataConfig(kind="image_folder", path=str(tmp_path), resolution=4, channels=1))[0]
    assert x.shape == (1, 4, 4) and torch.allclose(x, torch.full_like(x, 128 / 255 * 2 - 1), atol=1e-2)


def test_random_flip_flips_some_and_keeps_others():
    x = torch.arange(16.0).view(1, 1, 1, 16).repeat(64, 1, 1, 1)
    y = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (y == x.flip(-1)).all(dim=(1, 2, 3))
    kept = (y == x).all(dim=(1, 2, 3))
    assert bool((flipped | kept).all()) and 10 < int(flipped.sum()) < 54


def test_loader_is_seeded_and_drops_last():
    ds = digits_dataset(8, 1)
    a = next(iter(make_loader(ds, 32, seed=3)))[0]
    b = next(iter(make_loader(ds, 32, seed=3)))[0]
    assert torch.equal(a, b) and len(make_loader(ds, 1000, seed=0)) == 1
