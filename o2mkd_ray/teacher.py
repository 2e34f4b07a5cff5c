"""The teacher: loading (hub id, local folder, embedded default, ``module:factory``) and one callable contract.

Everything that needs teacher targets talks to ``teacher(x_t, t, features=...) -> (eps, feats)``: an in-process
:class:`TeacherFn` or a remote :class:`TeacherClient` (``o2mkd_ray.teacher_service``) are a config switch, not a
code fork (DESIGN rule 2).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, TeacherConfig
from .kd import FeatureHooks, dummy_cond, hookable_blocks

EMBEDDED_TEACHER = Path(__file__).parent / "assets" / "digits_teacher"


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or Path(spec).exists() or spec.count("/") != 1


def _load_scheduler(path: str, subfolder: str | None):
    from diffusers import DDPMScheduler

    # the training schedule (add_noise) is the same for DDPM/DDIM/...: read its config into a DDPMScheduler
    for sub in ([subfolder] if subfolder else []) + ["scheduler", None]:
        try:
            return DDPMScheduler.from_pretrained(path, subfolder=sub)
        except (OSError, EnvironmentError, ValueError):
            continue
    raise ConfigError(f"teacher.pretrained: no scheduler config found in {path!r} (expected scheduler/scheduler_config.json)")


def teacher_kind(tcfg: TeacherConfig) -> str:
    """``"unet"`` or ``"stable_diffusion"``: ``teacher.kind``, or read from a local folder when it is ``auto``."""
    if tcfg.kind != "auto":
        return tcfg.kind
    if tcfg.factory:
        return "unet"
    from .sd import is_sd_folder

    spec = tcfg.pretrained or str(EMBEDDED_TEACHER)
    return "stable_diffusion" if _looks_local(spec) and is_sd_folder(spec) else "unet"


def _unet_class(spec: str, subfolder: str | None, kind: str):
    from diffusers import UNet2DConditionModel, UNet2DModel

    if kind == "stable_diffusion":
        return UNet2DConditionModel
    if _looks_local(spec):
        f = Path(spec).expanduser() / (subfolder or "") / "config.json"
        if f.is_file() and _read_json(f, "teacher.pretrained").get("_class_name") == "UNet2DConditionModel":
            return UNet2DConditionModel
    return UNet2DModel


def _load_pretrained(spec: str, subfolder: str | None, kind: str = "unet"):
    local = _looks_local(spec)
    if kind == "stable_diffusion" and subfolder is None:
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
        raise ConfigError(f"teacher.pretrained: could not load UNet from {spec!r}{where}: {first}") from None
    scheduler = _load_scheduler(spec, None if subfolder in (None, "unet") else subfolder)
    return model, scheduler


def _load_factory(spec: str):
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


def load_teacher(tcfg: TeacherConfig):
    """Loads the teacher ε-model and its (training) noise scheduler.

    Args:
        tcfg: ``teacher.pretrained`` (hub id or local folder; ``subfolder`` supported), or ``teacher.factory``
            (``"module:function"`` returning ``(model, scheduler)``), or neither (the embedded digits teacher).
    Returns:
        ``(model, scheduler)``: model in eval mode with grads off; scheduler a diffusers scheduler with
        ``add_noise`` and ``config.num_train_timesteps``.
    """
    if tcfg.factory:
        model, scheduler = _load_factory(tcfg.factory)
    else:
        model, scheduler = _load_pretrained(tcfg.pretrained or str(EMBEDDED_TEACHER), tcfg.subfolder,
                                            teacher_kind(tcfg))
    pred = getattr(scheduler.config, "prediction_type", "epsilon")
    if pred != "epsilon":
        raise ConfigError(f"teacher: prediction_type {pred!r} is not supported yet; O2MKD here distils ε-prediction")
    model.eval().requires_grad_(False)
    return model, scheduler


def check_teacher(tcfg: TeacherConfig, data=None, *, segments=None, students=None) -> None:
    """Cheap pre-flight check (no weights loaded for local folders): raises ConfigError on a bad spec.

    Args:
        tcfg: the teacher section.
        data: optional DataConfig; its resolution/channels must match a UNet teacher's sample_size/in_channels.
        segments: optional SegmentsConfig; checked against the teacher scheduler's ``num_train_timesteps``
            (boundaries end at T, n <= T, fractions give no empty segment).
        students: optional StudentsConfig; every segment's student config is derived from the teacher's
            ``config.json`` and built on the meta device (no memory, no weights), so e.g. a width that leaves a
            block with zero channels fails here rather than in a Ray worker.
    """
    if tcfg.factory:
        model, scheduler = _load_factory(tcfg.factory)  # a user-named factory: calling it is what they asked for
        _check_prediction_type(getattr(scheduler.config, "prediction_type", "epsilon"), tcfg.factory)
        cfg = getattr(model, "config", None)
        ucfg = dict(cfg) if cfg is not None and hasattr(cfg, "keys") else {}
        _check_shapes(ucfg, data)
        T = getattr(scheduler.config, "num_train_timesteps", None)
        n = _check_segments(segments, T)
        if students is not None and n is not None:
            _check_students(students, n, lambda: model)
        return
    spec = tcfg.pretrained or str(EMBEDDED_TEACHER)
    if not _looks_local(spec):
        if tcfg.kind == "auto":
            raise ConfigError(f"teacher.kind: cannot tell what the hub model {spec!r} is before downloading it; set "
                              "teacher.kind to unet or stable_diffusion")
        return  # a hub id: checked when it is downloaded (no network access in preflight)
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise ConfigError(f"teacher.pretrained: folder {spec!r} does not exist; give a diffusers model folder or hub id")
    kind = teacher_kind(tcfg)
    if data is not None:
        from .config import check_kinds

        check_kinds(kind, data.kind)
    if kind == "stable_diffusion":
        from .sd import check_sd_folder

        check_sd_folder(p)
    sub = tcfg.subfolder or ("unet" if (p / "unet").is_dir() else "")
    cfg_file = p / sub / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"teacher.pretrained: {str(cfg_file)!r} not found; is {spec!r} a diffusers UNet folder?")
    ucfg = _read_json(cfg_file, "teacher.pretrained")
    cls = ucfg.get("_class_name", "UNet2DModel")
    want = "UNet2DConditionModel" if kind == "stable_diffusion" else "UNet2DModel"
    if cls != want:
        raise ConfigError(f"teacher.pretrained: {str(cfg_file)!r} describes a {cls}; a {kind} teacher folder must "
                          f"hold a diffusers {want} (wrap other models in teacher.factory='module:function')")
    _check_weights(p / sub)
    sched = _scheduler_config_file(p, tcfg.subfolder)
    if sched is None:
        raise ConfigError(f"teacher.pretrained: no scheduler config in {spec!r} (expected "
                          "scheduler/scheduler_config.json); save the teacher with its scheduler")
    scfg = _read_json(sched, "teacher.pretrained")
    _check_prediction_type(scfg.get("prediction_type", "epsilon"), str(sched))
    if kind == "unet":  # SD works in latent space: images are resized to what the VAE expects
        _check_shapes(ucfg, data)
    n = _check_segments(segments, scfg.get("num_train_timesteps", 1000))
    if students is not None and n is not None:
        _check_students(students, n, lambda: _ConfigOnly(ucfg))


def check_run(cfg) -> None:
    """All teacher-dependent checks of a run config before any Ray work (see :func:`check_teacher`)."""
    check_teacher(cfg.teacher, cfg.data, segments=cfg.segments, students=cfg.students)
    if cfg.eval.clip_model is not None and not Path(cfg.eval.clip_model).expanduser().is_dir():
        raise ConfigError(f"eval.clip_model: folder {cfg.eval.clip_model!r} does not exist; give a local CLIP "
                          "model folder (CLIPModel + processor) or remove it")


class _ConfigOnly(nn.Module):
    """A stand-in with only a teacher's ``config`` (student shapes come from it; no weights are loaded)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config


def _read_json(path: Path, key: str) -> dict:
    try:
        out = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{key}: {str(path)!r} is not valid JSON; re-save the model folder") from None
    if not isinstance(out, dict):
        raise ConfigError(f"{key}: {str(path)!r} does not hold a JSON object; re-save the model folder")
    return out


def _scheduler_config_file(p: Path, subfolder: str | None) -> Path | None:
    # the same places _load_scheduler looks, in the same order
    for sub in ([subfolder] if subfolder and subfolder != "unet" else []) + ["scheduler", ""]:
        f = p / sub / "scheduler_config.json"
        if f.is_file():
            return f
    return None


def _check_weights(folder: Path) -> None:
    """The UNet folder has weights, and a safetensors file has an intact header covering the whole file."""
    st = sorted(folder.glob("*.safetensors"))
    if not st and not any(folder.glob("*.bin")):
        raise ConfigError(f"teacher.pretrained: no weights (*.safetensors) in {str(folder)!r}; save the model "
                          "with save_pretrained")
    for f in st:
        check_safetensors(f, "teacher.pretrained")


def check_safetensors(path: str | Path, key: str) -> None:
    """Reads a safetensors header (cheap: no tensor data); ConfigError naming ``key`` on a corrupt/truncated file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key}: {str(path)!r} is corrupted or truncated ({why}); re-create or re-download "
                          "it") from None


def _check_prediction_type(pred: str, where: str) -> None:
    if pred != "epsilon":
        raise ConfigError(f"teacher: prediction_type {pred!r} ({where}) is not supported yet; O2MKD here distils "
                          "ε-prediction teachers (prediction_type: epsilon)")


def _check_shapes(ucfg: dict, data) -> None:
    if data is not None and isinstance(ucfg.get("sample_size"), int) and ucfg["sample_size"] != data.resolution:
        raise ConfigError(f"data.resolution: {data.resolution} but the teacher works at {ucfg['sample_size']}; "
                          f"set data.resolution={ucfg['sample_size']}")
    if data is not None and isinstance(ucfg.get("in_channels"), int) and ucfg["in_channels"] != data.channels:
        raise ConfigError(f"data.channels: {data.channels} but the teacher takes {ucfg['in_channels']}; "
                          f"set data.channels={ucfg['in_channels']}")


def _check_segments(segments, T) -> int | None:
    """Builds the Segments the run will use (boundaries end at T, n <= T, ...); returns their number."""
    if segments is None or not isinstance(T, int):
        return None
    from .segments import Segments

    return Segments.from_config(segments, T).n


def _check_students(st, n: int, teacher_like) -> None:
    """Every segment's student UNet config is valid: built on the meta device, so it costs no memory."""
    from .students import _make_unet, _per_segment, _teacher_unet_config, student_config

    widths = _per_segment(st.width, n, "students.width")
    layers = _per_segment(st.layers_per_block, n, "students.layers_per_block")
    with torch.device("meta"):
        if st.unet is not None:
            for lp in sorted(set(layers), key=str):
                ucfg = dict(st.unet, **({} if lp is None else {"layers_per_block": int(lp)}))
                _make_unet(dict(ucfg, mid_block_type=None) if st.drop_mid_block else ucfg, "students.unet")
            return
        tcfg = _teacher_unet_config(teacher_like())
        for w, lp in sorted(set(zip(widths, layers)), key=str):
            _make_unet(student_config(tcfg, w, lp, drop_mid_block=st.drop_mid_block), "students.width")


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
        model: the ε-prediction network (``model(x_t, t)``).
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
        """``x_t: (B, C, H, W)``, ``t: (B,)``, ``cond``: text embeddings ``(B, L, D)`` for a conditional UNet."""
        x_t = x_t.to(self.device)
        t = t.to(self.device)
        kw = cond_kwargs(cond, self.device, self.dtype)
        if self.hooks is not None:
            self.hooks.clear()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            eps = eps_of(self.model(x_t.to(self.dtype) if self.dtype != torch.float32 else x_t, t, **kw)).float()
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


def cond_kwargs(cond: torch.Tensor | None, device=None, dtype: torch.dtype | None = None) -> dict:
    """The forward kwargs of a conditional UNet for text embeddings ``cond`` (``{}`` when None)."""
    if cond is None:
        return {}
    return {"encoder_hidden_states": cond.to(device=device, dtype=dtype if dtype is not None else cond.dtype)}

