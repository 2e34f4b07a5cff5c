"""Class-conditional DiT teachers (``DiTPipeline`` folders): recognising a folder, checking its components, the VAE
that encodes class-labelled images to the latents the transformer works on.

O2MKD distils only the ``DiTTransformer2DModel``; the students share the teacher's VAE, scheduler and class names.
"""

from __future__ import annotations

import json
from pathlib import Path

from o2mkd_ray.errors import ConfigError

DIT_COMPONENTS = ("transformer", "vae", "scheduler")
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}  # those o2mkd_ray.data.images reads


def saved_class_name(f: Path) -> str | None:
    """The ``_class_name`` a diffusers JSON file (``model_index.json``, a component's config) names; None when the
    file is missing, unreadable or names none."""
    try:
        d = json.loads(f.read_text()) if f.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    return d.get("_class_name") if isinstance(d, dict) else None


def is_dit_folder(path: str | Path) -> bool:
    """True when ``path`` is a local DiT folder: its ``model_index.json`` names ``DiTPipeline``, or its
    ``transformer/config.json`` a ``DiTTransformer2DModel`` (a folder saved without the index)."""
    p = Path(path).expanduser()
    return (saved_class_name(p / "model_index.json") == "DiTPipeline"
            or saved_class_name(p / "transformer" / "config.json") == "DiTTransformer2DModel")


def check_dit_folder(path: str | Path, key: str = "teacher.pretrained") -> None:
    """ConfigError (one line) unless every component a DiT teacher needs is in the folder, the transformer being a
    ``DiTTransformer2DModel``."""
    p = Path(path).expanduser()
    missing = [c for c in DIT_COMPONENTS if not (p / c).is_dir()]
    if missing:
        raise ConfigError(f"{key}: {str(p)!r} is not a complete DiT folder (missing "
                          f"{', '.join(m + '/' for m in missing)}); save it with DiTPipeline.save_pretrained")
    cls = saved_class_name(p / "transformer" / "config.json")
    if cls != "DiTTransformer2DModel":
        raise ConfigError(f"{key}: {str(p / 'transformer')!r} holds a {cls}, not a DiTTransformer2DModel; give a "
                          "DiT folder (DiTPipeline.save_pretrained)")


def id2label(path: str | Path) -> dict[int, str]:
    """The teacher's class names (``model_index.json``'s ``id2label``, as the hub's DiT folders keep it); ``{}``
    when it has none."""
    f = Path(path).expanduser() / "model_index.json"
    try:
        d = json.loads(f.read_text()) if f.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return {}
    raw = d.get("id2label") if isinstance(d, dict) else None
    return {int(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _label_of(name: str, names: dict[int, str], num_classes: int | None) -> int | None:
    """The class id a subfolder name stands for: an integer id, or one of the comma-separated ``id2label`` names."""
    if name.isdigit():
        k = int(name)
        return k if num_classes is None or k < num_classes else None
    want = name.strip().lower()
    for k, label in names.items():
        if want == label.lower() or want in (p.strip().lower() for p in label.split(",")):
            return k
    return None


def read_class_folder(root: str | Path, names: dict[int, str], num_classes: int | None) -> tuple[list, list]:
    """``(files, labels)`` of a folder with one subfolder of images per class, files sorted, one label each.

    Raises:
        ConfigError: no folder, no class subfolder, a subfolder naming no class, or no images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.path: folder {str(root)!r} does not exist; give a folder with one subfolder of "
                          "images per class")
    subs = sorted(p for p in root.iterdir() if p.is_dir())
    if not subs:
        raise ConfigError(f"data.path: {str(root)!r} has no class subfolders; put each class's images in a "
                          "subfolder named by its class id (e.g. 207/) or class name")
    files, labels = [], []
    for sub in subs:
        k = _label_of(sub.name, names, num_classes)
        if k is None:
            top = f"0..{num_classes - 1}" if num_classes else "an integer"
            raise ConfigError(f"data.path: subfolder {sub.name!r} names no class of the teacher; name it by a class "
                              f"id ({top}) or a name in the teacher's id2label")
        found = sorted(p for p in sub.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        files += found
        labels += [k] * len(found)
    if not files:
        raise ConfigError(f"data.path: the class subfolders of {str(root)!r} hold no PNG/JPEG images")
    return files, labels


def load_dit_vae(spec: str):
    """The teacher's ``AutoencoderKL`` (``vae/`` of a DiT folder or hub id), in eval mode with grads off."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(spec, subfolder="vae")
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"teacher.pretrained: could not load the DiT VAE from {spec!r}: {first}") from None
    return vae.eval().requires_grad_(False)
