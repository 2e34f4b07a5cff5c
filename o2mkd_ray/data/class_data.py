"""The class-conditional training data (DiT teachers): x_0 latents with their class labels, computed once per run.

Two sources: a folder with one subfolder of images per class (``data.path``; a subfolder is named by its class id,
``"207"``, or by one of the teacher's ``id2label`` names, ``"goldfish"``), encoded with the teacher's VAE as
``DiTPipeline`` decodes them (a posterior sample times ``scaling_factor``); or, without ``data.path``, latents the
teacher samples itself from ``data.synth_samples`` random class labels (DDIM, ``data.synth_steps`` steps, guidance
``data.synth_guidance`` against the null class), so a run needs no images at all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from o2mkd_ray.core.atomic import replace_file
from o2mkd_ray.core.dit import read_class_folder
from o2mkd_ray.data.images import check_image


def class_cache_key(cfg) -> str:
    """What the cached latents depend on (teacher, image folder or synthesis settings, seed)."""
    d = cfg.to_dict()
    keep = {"teacher": {k: d["teacher"][k] for k in ("pretrained", "subfolder", "kind")},
            "data": {k: d["data"][k] for k in ("kind", "path", "synth_steps", "synth_guidance", "synth_samples")},
            "seed": d["train"]["seed"]}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def build_class_data(cfg, teacher, scheduler_config, teacher_fn=None, cache_dir=None, log=print) -> dict:
    """Class-labelled latents for a DiT teacher, cached in ``cache_dir`` (see the module docstring).

    Args:
        teacher: the teacher ``DiTTransformer2DModel`` (its latent shape and number of classes; samples
            in-process when ``teacher_fn`` is None).
        scheduler_config: the teacher's noise schedule (the synthesis' DDIM scheduler is built on it).
        teacher_fn: optional teacher callable (e.g. the Ray teacher service) for the synthesis.
        cache_dir: a folder; the cache file is reused when its key matches, written atomically otherwise.
    Returns:
        numpy arrays ``"latents"`` (N, C, h, w) float32, ``"class_labels"`` (N,) int64 and
        ``"uncond_class_labels"`` (1,) int64 (the null class, ``num_embeds_ada_norm``).
    """
    from safetensors.torch import load_file, save_file

    key = class_cache_key(cfg)
    path = Path(cache_dir) / f"classes-{key}.safetensors" if cache_dir else None
    if path is not None and path.is_file():
        log(f"class-conditional data: reusing cache {path.name}")
        return {n: v.numpy() for n, v in load_file(str(path)).items()}
    c = teacher.config
    num_classes = int(c.num_embeds_ada_norm)
    shape = (int(c.in_channels), int(c.sample_size), int(c.sample_size))
    null = torch.tensor([num_classes])
    if cfg.data.path:
        latents, labels = _encode_class_folder(cfg, shape[1], num_classes, log)
    else:
        from o2mkd_ray.core.teacher import TeacherFn
        from o2mkd_ray.data.cond_cache import synthesize_latents

        n = cfg.data.synth_samples
        labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(cfg.train.seed))
        log(f"class-conditional data: no images; sampling {n} latents of random classes with the teacher "
            f"({cfg.data.synth_steps} DDIM steps, guidance {cfg.data.synth_guidance})")
        latents = synthesize_latents(teacher_fn or TeacherFn(teacher, []), scheduler_config, {"class_labels": labels},
                                     {"class_labels": null}, shape, cfg.data.synth_steps, cfg.data.synth_guidance,
                                     cfg.train.seed)
    out = {"latents": latents.float().contiguous(), "class_labels": labels.long().contiguous(),
           "uncond_class_labels": null}
    if path is not None:
        with replace_file(path) as tmp:
            save_file(out, str(tmp), metadata={"key": key})
    return {n: v.numpy() for n, v in out.items()}


def _encode_class_folder(cfg, size: int, num_classes: int, log) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latents ``(N, C, size, size)`` of a class folder's images and their labels ``(N,)``."""
    from o2mkd_ray.core.dit import id2label, load_dit_vae
    from o2mkd_ray.core.sd import encode_images, vae_scale_factor
    from o2mkd_ray.data.captions import load_caption_image

    files, labels = read_class_folder(cfg.data.path, id2label(cfg.teacher.pretrained), num_classes)
    check_image(files[0])
    vae = load_dit_vae(cfg.teacher.pretrained)
    res = size * vae_scale_factor(vae)
    log(f"class-conditional data: encoding {len(files)} images of {len(set(labels))} classes at {res}x{res}")
    g = torch.Generator().manual_seed(cfg.train.seed)
    chunks = []
    for i in range(0, len(files), 64):  # streamed: a large folder would not fit in memory at once
        chunks.append(encode_images(vae, torch.stack([load_caption_image(f, res) for f in files[i:i + 64]]), g))
    return torch.cat(chunks), torch.tensor(labels, dtype=torch.long)
