"""The teacher: loading (hub id, local folder, embedded default, ``module:factory``) and one callable contract.

Everything that needs teacher targets talks to ``teacher(x_t, t, features=...) -> (eps, feats)``: an in-process
:class:`TeacherFn` or a remote :class:`TeacherClient` (``o2mkd_ray.engine.teacher_service``) are a config switch,
not a code fork.
"""

from __future__ import annotations

import importlib
import json
import time
from pathlib import Path

import torch
from torch import nn

from o2mkd_ray.config.checks import CLASS_KINDS, FLOW_KINDS, TEXT_TO_IMAGE_KINDS, TRANSFORMER_KINDS
from o2mkd_ray.config.schema import TeacherConfig
from o2mkd_ray.core.conditioning import call_denoiser, cond_kwargs, from_items
from o2mkd_ray.core.features import FeatureHooks, dummy_cond, hookable_blocks
from o2mkd_ray.core.targets import check_prediction_type, prediction_type
from o2mkd_ray.errors import ConfigError

EMBEDDED_TEACHER = Path(__file__).resolve().parent.parent / "assets" / "digits_teacher"


def looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).exists() or spec.count("/") != 1


def _load_scheduler(path: str, subfolder: str | None, flow: bool = False):
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from o2mkd_ray.core.flow_matching import FlowMatchTraining

    # the training schedule (add_noise) is the same for DDPM/DDIM/...: read its config into a DDPMScheduler; a
    # flow-matching teacher's into its FlowMatchEulerDiscreteScheduler, behind the same training interface
    for sub in ([subfolder] if subfolder else []) + ["scheduler", None]:
        try:
            if flow:
                return FlowMatchTraining(FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder=sub))
            return DDPMScheduler.from_pretrained(path, subfolder=sub)
        except (OSError, EnvironmentError, ValueError):
            continue
    raise ConfigError(f"teacher.pretrained: no scheduler config found in {path!r} (expected scheduler/scheduler_config.json)")


def teacher_kind(tcfg: TeacherConfig) -> str:
    """``"unet"``, ``"stable_diffusion"``, ``"stable_diffusion_xl"``, ``"dit"`` or ``"sd3"``: ``teacher.kind``, or
    read from a local folder when it is ``auto`` (SDXL: a Stable Diffusion folder whose ``model_index.json`` names
    an SDXL pipeline; DiT: a ``DiTPipeline`` folder; SD3: a ``StableDiffusion3Pipeline`` folder)."""
    if tcfg.kind != "auto":
        return tcfg.kind
    if tcfg.factory:
        return "unet"
    from o2mkd_ray.core.dit import is_dit_folder
    from o2mkd_ray.core.sd import is_sd_folder, is_sdxl_folder

    spec = tcfg.pretrained or str(EMBEDDED_TEACHER)
    from o2mkd_ray.core.sd3 import is_sd3_folder

    if looks_local(spec) and is_dit_folder(spec):
        return "dit"
    if looks_local(spec) and is_sd3_folder(spec):
        return "sd3"
    if not (looks_local(spec) and is_sd_folder(spec)):
        return "unet"
    return "stable_diffusion_xl" if is_sdxl_folder(spec) else "stable_diffusion"


def _unet_class(spec: str, subfolder: str | None, kind: str):
    from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel

    if kind in CLASS_KINDS:
        return DiTTransformer2DModel
    if kind == "sd3":
        return SD3Transformer2DModel
    if kind in TEXT_TO_IMAGE_KINDS:
        return UNet2DConditionModel
    if looks_local(spec):
        f = Path(spec).expanduser() / (subfolder or "") / "config.json"
        if f.is_file() and read_json_config(f, "teacher.pretrained").get("_class_name") == "UNet2DConditionModel":
            return UNet2DConditionModel
    return UNet2DModel


def _load_pretrained(spec: str, subfolder: str | None, kind: str = "unet"):
    local = looks_local(spec)
    if subfolder is None and kind in TRANSFORMER_KINDS:
        subfolder = "transformer"
    if subfolder is None and kind in TEXT_TO_IMAGE_KINDS:
        subfolder = "unet"
    if local:
        p = Path(spec).expanduser()
        if not p.is_dir():
            raise ConfigError(f"teacher.pretrained: folder {spec!r} does not exist; give a diffusers model folder or hub id")
        spec = str(p)
        if subfolder is None and (p / "unet").is_dir():
            subfolder = "unet"
        cfg_file = p / (subfolder or "") / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"teacher.pretrained: {str(cfg_file)!r} not found; is {spec!r} a diffusers UNet folder?")
    try:
        model = _unet_class(spec, subfolder, kind).from_pretrained(spec, subfolder=subfolder, use_safetensors=None)
    except (OSError, EnvironmentError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "" if local else " (offline? download it and point teacher.pretrained at the local folder)"
        raise ConfigError(f"teacher.pretrained: could not load the denoiser from {spec!r}{where}: {first}") from None
    scheduler = _load_scheduler(spec, None if subfolder in (None, "unet", "transformer") else subfolder,
                                flow=kind in FLOW_KINDS)
    return model, scheduler


def load_factory(spec: str):
    mod_name, fn_name = spec.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"teacher.factory: cannot import module {mod_name!r} ({e}); is it on PYTHONPATH?") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"teacher.factory: module {mod_name!r} has no callable {fn_name!r}")
    out = fn()
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module) and hasattr(out[1], "add_noise")):
        raise ConfigError(
            f"teacher.factory: {spec} must return (torch.nn.Module, diffusers scheduler), got {type(out).__name__}"
        )
    return out


def compute_dtype(tcfg: TeacherConfig, device) -> torch.dtype:
    """The teacher's compute dtype on ``device``: ``teacher.dtype`` on a CUDA device, float32 elsewhere (bf16/fp16
    autocast on CPU is slower, not faster)."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[tcfg.dtype]


def load_teacher(tcfg: TeacherConfig):
    """Loads the teacher model (ε-, v- or x_0-prediction, as its scheduler says) and its (training) noise scheduler.

    Args:
        tcfg: ``teacher.pretrained`` (hub id or local folder; ``subfolder`` supported), or ``teacher.factory``
            (``"module:function"`` returning ``(model, scheduler)``), or neither (the embedded digits teacher).
    Returns:
        ``(model, scheduler)``: model in eval mode with grads off; scheduler a diffusers scheduler with
        ``add_noise`` and ``config.num_train_timesteps`` (a flow-matching teacher's: a
        :class:`~o2mkd_ray.core.flow_matching.FlowMatchTraining` with the same interface).
    """
    if tcfg.factory:
        model, scheduler = load_factory(tcfg.factory)
    else:
        model, scheduler = _load_pretrained(tcfg.pretrained or str(EMBEDDED_TEACHER), tcfg.subfolder,
                                            teacher_kind(tcfg))
    if not getattr(scheduler, "flow_matching", False):  # flow matching: velocity, whatever the config says
        check_prediction_type(prediction_type(scheduler), tcfg.factory or tcfg.pretrained or str(EMBEDDED_TEACHER))
    model.eval().requires_grad_(False)
    return model, scheduler


def sample_shape(model: nn.Module, channels: int, resolution: int) -> tuple[int, int, int]:
    """``(C, H, W)`` of the model's inputs: from a diffusers config when present, else from data config."""
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "sample_size", None) if cfg is not None else None
    ch = getattr(cfg, "in_channels", None) if cfg is not None else None
    if isinstance(size, int) and isinstance(ch, int):
        return (ch, size, size)
    if isinstance(size, (list, tuple)) and isinstance(ch, int):
        return (ch, int(size[0]), int(size[1]))
    return (channels, resolution, resolution)


def eps_of(out) -> torch.Tensor:
    """A model output as a tensor: diffusers outputs carry ``.sample``; plain modules return tensors."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return out[0]
    raise TypeError(f"teacher returned {type(out).__name__}; expected a tensor or an object with .sample")


class TeacherFn:
    """In-process teacher behind the common callable: ``(x_t, t, features) -> (eps, feats | None)``.

    Args:
        model: the denoising network (``model(x_t, t)``), in any parameterisation.
        feature_blocks: names of blocks to hook for feature KD (None: every hookable block).
        dtype: compute dtype (bf16/fp16 only make sense on GPU).
    """

    def __init__(self, model: nn.Module, feature_blocks: list[str] | None = None, dtype: torch.dtype = torch.float32):
        self.model = model.eval().requires_grad_(False)
        self.dtype = dtype
        blocks = hookable_blocks(model)
        self.blocks = [b for b in (feature_blocks or blocks) if b in blocks]
        self.hooks = FeatureHooks(model, self.blocks) if self.blocks else None
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, features: bool = False, cond: torch.Tensor | None = None):
        """``x_t: (B, C, H, W)``, ``t: (B,)``, ``cond``: a conditional UNet's condition (text embeddings
        ``(B, L, D)``, or a dict with SDXL's ``text_embeds`` / ``time_ids`` too; :mod:`o2mkd_ray.core.conditioning`)."""
        x_t = x_t.to(self.device)
        t = t.to(self.device)
        kw = cond_kwargs(cond, self.device, self.dtype)
        if self.hooks is not None:
            self.hooks.clear()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            eps = eps_of(call_denoiser(self.model, x_t.to(self.dtype) if self.dtype != torch.float32 else x_t, t,
                                       **kw)).float()
        feats = None
        if features and self.hooks is not None:
            feats = {k: v.float() for k, v in self.hooks.features.items()}
        return eps, feats

    def feature_channels(self, shape: tuple[int, int, int]) -> dict[str, int]:
        """Channels of each hooked block's output, from one dummy forward at batch 1."""
        if not self.blocks:
            return {}
        x = torch.zeros(1, *shape, device=self.device)
        _, feats = self(x, torch.zeros(1, dtype=torch.long, device=self.device), features=True,
                        cond=dummy_cond(self.model))
        return {k: int(v.shape[1]) for k, v in feats.items()}


def batch_cond(items):
    """The conditioning of dataset items ``(x_0, *cond)`` as one batch (each entry stacked to ``(B, ...)``; SDXL's
    entries as a dict, :func:`o2mkd_ray.core.conditioning.from_items`), for
    :func:`~o2mkd_ray.core.conditioning.cond_kwargs`; None for unconditional items ``(x_0,)``."""
    return from_items([torch.stack([it[j] for it in items]) for j in range(1, len(items[0]))])


def read_json_config(path: Path, key: str) -> dict:
    try:
        out = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{key}: {str(path)!r} is not valid JSON; re-save the model folder") from None
    if not isinstance(out, dict):
        raise ConfigError(f"{key}: {str(path)!r} does not hold a JSON object; re-save the model folder")
    return out


class LocalTeacher:
    """The same submit/result/__call__ contract over an in-process :class:`TeacherFn`."""

    def __init__(self, fn):
        self.fn = fn
        self.latency_s = 0.0
        self.calls = 0

    def submit(self, x_t, t, features: bool = False, cond=None):
        return (x_t, t, features, cond)

    def result(self, pending):
        t0 = time.perf_counter()
        out = self.fn(*pending)
        self.latency_s += time.perf_counter() - t0
        self.calls += 1
        return out

    def __call__(self, x_t, t, features: bool = False, cond=None):
        return self.result(self.submit(x_t, t, features, cond))
