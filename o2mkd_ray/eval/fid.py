"""FID and KID of generated images: the feature spaces (Inception-v3 backends, the random-conv fallback),
Fréchet distance, kernel inception distance, and the dataset reference images.

Plain torch/NumPy/SciPy (no Ray, no MLflow); :mod:`o2mkd_ray.eval.evaluate` uses it and re-exports its names.

FID/KID feature space (the report's ``fid_backend`` names the one used and ``fid_backend_reason`` says why):

* Inception-v3 (the standard FID network) when a local weights path is configured (``eval.fid_weights``,
  else the ``O2MKD_FID_WEIGHTS`` environment variable) AND a package that can run it is importable:
  torch-fidelity or torchmetrics for its ``.pth`` state dict (``weights-inception-2015-12-05-6726825d.pth``),
  clean-fid for NVIDIA's TorchScript ``inception-2015-12-05.pt`` (the file, or a folder holding it). Nothing
  is downloaded.
* otherwise ``random-conv``, the offline fallback: see :func:`random_conv_features`. Its numbers rank models
  on one dataset but are NOT comparable to published (Inception) FIDs. Weights that are configured but
  unusable are reported in ``fid_backend_reason`` and logged as a warning, never dropped silently.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


FID_WEIGHTS_ENV = "O2MKD_FID_WEIGHTS"


REFERENCE_IMAGES = 1000  # dataset images for the FID/KID reference statistics


# evaluation draws differ from training (seed + k) and validation (10_000 + k) draws: evaluation's agreement
# draws use this offset, the reference images here use it + 1
FID_SEED_OFFSET = 20_000


@dataclass
class FeatureSpace:
    """An image feature extractor for FID/KID: ``extract((N, H, W, C) in [0, 1]) -> (N, D)`` float64."""

    backend: str
    reason: str
    extract: Callable[[np.ndarray], np.ndarray]
    comparable_to_published: bool


def _to_nchw3(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)  # (N, C, H, W)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


@torch.no_grad()
def _batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 64) -> np.ndarray:
    out = [fn(x[i:i + batch]).float().cpu().flatten(1) for i in range(0, len(x), batch)]
    return torch.cat(out).double().numpy()


def random_conv_net(seed: int = 0) -> nn.Sequential:
    """The fixed random network of the ``random-conv`` FID fallback (weights from NumPy's PCG64, so identical
    on every machine and torch version): 4 He-initialised 3×3 convs 3→32→64→64→32 (strides 1, 2, 2, 2) with
    ReLU on a 32×32 input, then a 2×2 average pool: 128 features."""
    rng = np.random.default_rng(seed)
    layers: list[nn.Module] = []
    for c_in, c_out, stride in ((3, 32, 1), (32, 64, 2), (64, 64, 2), (64, 32, 2)):
        conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
        w = rng.standard_normal((c_out, c_in, 3, 3)) * math.sqrt(2.0 / (c_in * 9))  # He: O(1) activations
        conv.weight.data = torch.from_numpy(w.astype(np.float32))
        conv.bias.data.zero_()
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten()).eval().requires_grad_(False)


def random_conv_features(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """Features of the offline FID fallback ("random-network FID").

    Why this fallback: Inception-v3 weights are a download, unavailable offline, and Inception features of
    16×16 grayscale digits (upsampled to 299×299 RGB) are of doubtful meaning anyway. Fréchet/MMD distances in
    the embedding of a fixed, randomly initialised conv net are an established stand-in for domains without a
    suitable pretrained network (Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative
    Models", evaluate random-initialised embeddings for this purpose): random conv filters respond to local
    structure (strokes, edges, blur, noise), and the 2×2 pooling keeps coarse layout, at a fixed 128 dims for
    any resolution. Raw pixels were rejected: their Fréchet distance is dominated by per-pixel variance, blind
    to structure, and its dimension (H·W·C) outgrows the sample counts used here. The numbers rank models on
    one dataset; they are not comparable to published Inception FIDs.

    Args:
        images: ``(N, H, W, C)`` in [0, 1]; grayscale is repeated to 3 channels.
        seed: weight seed (keep 0 to compare across runs).
    Returns:
        ``(N, 128)`` float64.
    """
    net = random_conv_net(seed)
    x = _to_nchw3(images)
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=x.shape[-1] > 32)
    return _batched(net, x * 2 - 1)


def _uint8(images: np.ndarray) -> torch.Tensor:
    return (_to_nchw3(images) * 255).round().clamp(0, 255).to(torch.uint8)  # (N, 3, H, W)


def _inception_torch_fidelity(path: Path, device) -> Callable[[np.ndarray], np.ndarray]:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(path))
    net = net.to(device).eval()
    return lambda im: _batched(lambda x: net(x.to(device))[0], _uint8(im))


def _inception_torchmetrics(path: Path, device) -> Callable[[np.ndarray], np.ndarray]:
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(path)).to(device).eval()

    def fwd(x):
        out = net(x.to(device))
        return out[0] if isinstance(out, (tuple, list)) else out

    return lambda im: _batched(fwd, _uint8(im))


def _inception_clean_fid(path: Path, device) -> Callable[[np.ndarray], np.ndarray]:
    from cleanfid.inception_torchscript import InceptionV3W

    folder = path.parent if path.is_file() else path
    if not (folder / "inception-2015-12-05.pt").is_file():
        raise FileNotFoundError(f"no inception-2015-12-05.pt in {str(folder)!r}")
    net = InceptionV3W(str(folder), download=False, resize_inside=True).to(device).eval()
    return lambda im: _batched(lambda x: net(x.to(device).float()), _uint8(im))


_INCEPTION_BACKENDS = (  # (name, builder, weight files it reads)
    ("inception-torch-fidelity", _inception_torch_fidelity, (".pth", ".pt")),
    ("inception-torchmetrics", _inception_torchmetrics, (".pth", ".pt")),
    ("inception-clean-fid", _inception_clean_fid, (".pt", "")),
)


def fid_feature_space(weights: str | None = None, device="cpu") -> FeatureSpace:
    """Picks the FID/KID feature space (see the module docstring).

    Args:
        weights: a local Inception weights file/folder; None reads ``$O2MKD_FID_WEIGHTS``.
        device: where the Inception network runs.
    Returns:
        A :class:`FeatureSpace` whose ``backend`` and ``reason`` go into the report.
    """
    fallback = "random-conv"
    source = "eval.fid_weights" if weights else f"${FID_WEIGHTS_ENV}"
    weights = weights or os.environ.get(FID_WEIGHTS_ENV) or None
    if not weights:
        reason = (f"no Inception weights configured (eval.fid_weights and ${FID_WEIGHTS_ENV} unset); offline "
                  "random-network features, not comparable to published FIDs")
        return FeatureSpace(fallback, reason, random_conv_features, False)
    path = Path(weights).expanduser()
    if not path.exists():
        reason = f"{source}={weights!r} does not exist"
    else:
        tried = []
        for name, build, suffixes in _INCEPTION_BACKENDS:
            kind = path.suffix if path.is_file() else ""
            if kind not in suffixes:
                tried.append(f"{name}: does not read {'a folder' if not kind else kind + ' files'}")
                continue
            try:
                extract = build(path, device)
            except ImportError as e:
                tried.append(f"{name}: not importable ({e.name or e})")
                continue
            except Exception as e:  # noqa: BLE001 - a bad weights file: try the next backend, then say why
                tried.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            return FeatureSpace(name, f"Inception-v3 2048-d pool features, weights from {source}={weights!r}",
                                extract, True)
        reason = f"{source}={weights!r} is set but no backend could use it ({'; '.join(tried)})"
    reason += "; FELL BACK to random-network features, not comparable to published FIDs"
    log.warning("FID: %s", reason)
    return FeatureSpace(fallback, reason, random_conv_features, False)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017, eq. in §3):
    ``|μ_a − μ_b|² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)``, matrix root by ``scipy.linalg.sqrtm``; NaN for < 2
    rows."""
    import warnings

    from scipy import linalg

    if len(feats_a) < 2 or len(feats_b) < 2:
        return float("nan")
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular Σ (fewer samples than dims) is expected with small N
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(covmean).all():  # as pytorch-fid: nudge the diagonals off singularity
            off = np.eye(len(s_a)) * eps
            covmean = linalg.sqrtm((s_a + off) @ (s_b + off))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    return max(0.0, float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean)))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k_xx = (x @ x.T / d + 1) ** 3  # polynomial kernel of KID (Bińkowski et al. 2018): (x·y/d + 1)^3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                 - 2.0 * k_xy.mean())


def kernel_inception_distance(feats_a: np.ndarray, feats_b: np.ndarray, subset_size: int = 1000,
                              num_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD² with the cubic polynomial kernel, averaged over random subsets (as torch-fidelity).

    Returns:
        ``(mean, std)`` over subsets; one subset (std 0) when both sets fit in ``subset_size``; NaN for < 2
        rows.
    """
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    m_a, m_b = min(len(a), subset_size), min(len(b), subset_size)
    if m_a < 2 or m_b < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    reps = 1 if (m_a == len(a) and m_b == len(b)) else num_subsets
    def pick(x: np.ndarray, m: int) -> np.ndarray:
        return x if m == len(x) else x[rng.choice(len(x), m, replace=False)]

    vals = [_mmd2_unbiased(pick(a, m_a), pick(b, m_b)) for _ in range(reps)]
    return float(np.mean(vals)), float(np.std(vals))


def reference_images(dataset, num: int, value_range, seed: int = 0) -> np.ndarray:
    """``num`` dataset images (fixed draw, without replacement) as ``(N, H, W, C)`` in [0, 1]."""
    g = torch.Generator().manual_seed(FID_SEED_OFFSET + 1 + seed)
    idx = torch.randperm(len(dataset), generator=g)[:num]
    x = torch.stack([dataset[int(i)][0] for i in idx]).float()  # (N, C, H, W)
    lo, hi = value_range
    return ((x - lo) / (hi - lo)).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def fid_kid(space: FeatureSpace, sets: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> dict:
    """FID and KID for each ``(a, b)`` pair of named image sets, in one feature space.

    Returns:
        ``{"a_vs_b": {"fid", "kid", "kid_std", "n_a", "n_b"}, ...}``; values that cannot be computed (< 2
        images) are None with a ``null_reason``.
    """
    feats = {k: space.extract(v) for k, v in sets.items()}
    out = {}
    for a, b in pairs:
        fid = frechet_distance(feats[a], feats[b])
        kid, kid_std = kernel_inception_distance(feats[a], feats[b])
        row = {"fid": fid, "kid": kid, "kid_std": kid_std, "n_a": len(feats[a]), "n_b": len(feats[b])}
        if not all(math.isfinite(v) for v in (fid, kid, kid_std)):
            row = {**{k: (v if isinstance(v, int) or math.isfinite(v) else None) for k, v in row.items()},
                   "null_reason": "FID/KID need at least 2 images per set"}
        out[f"{a}_vs_{b}"] = row
    return out


def fid_section(space: FeatureSpace, sets: dict[str, np.ndarray], pairs: list[tuple[str, str]],
                note: str) -> dict:
    """The report's FID/KID fields: ``fid_backend``, ``fid_backend_reason`` and ``fid`` (the space's labels, a
    ``note`` on the sample sizes, and :func:`fid_kid` of each pair).

    Args:
        space: from :func:`fid_feature_space`.
        sets, pairs: as :func:`fid_kid`.
        note: how the sets were drawn (sizes, pairing), for the reader.
    Returns:
        The three report fields.
    """
    return {"fid_backend": space.backend, "fid_backend_reason": space.reason,
            "fid": {"backend": space.backend, "comparable_to_published": space.comparable_to_published,
                    "note": note, **fid_kid(space, sets, pairs)}}


def fid_metrics(section: dict) -> dict:
    """``{fid_<pair>: FID, kid_<pair>: KID}`` of each pair of a :func:`fid_section`, for the report's metrics."""
    out = {}
    for pair, vals in section["fid"].items():
        if isinstance(vals, dict):
            out[f"fid_{pair}"], out[f"kid_{pair}"] = vals["fid"], vals["kid"]
    return out
