"""Pre-flight checks of a teacher and of the students a config derives from it (meta device, no weights read).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from o2mkd_ray.config.checks import CLASS_KINDS, FLOW_KINDS, TEXT_TO_IMAGE_KINDS, TRANSFORMER_KINDS
from o2mkd_ray.config.schema import TeacherConfig
from o2mkd_ray.core.kd import check_kd_method
from o2mkd_ray.core.schedulers import check_scheduler_name
from o2mkd_ray.core.targets import check_prediction_type
from o2mkd_ray.core.teacher import EMBEDDED_TEACHER, load_factory, looks_local, read_json_config, teacher_kind
from o2mkd_ray.errors import ConfigError


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
        _check_factory_teacher(tcfg, data, segments, students)
        return
    spec = tcfg.pretrained or str(EMBEDDED_TEACHER)
    if not looks_local(spec):
        if tcfg.kind in TEXT_TO_IMAGE_KINDS:
            from o2mkd_ray.core.sd import require_text_to_image_extra

            require_text_to_image_extra("teacher.kind")
        if tcfg.kind == "auto":
            raise ConfigError(f"teacher.kind: cannot tell what the hub model {spec!r} is before downloading it; set "
                              "teacher.kind to unet, stable_diffusion, stable_diffusion_xl, dit or sd3")
        return  # a hub id: checked when it is downloaded (no network access in preflight)
    p = Path(spec).expanduser()
    if not p.is_dir():
        raise ConfigError(f"teacher.pretrained: folder {spec!r} does not exist; give a diffusers model folder or hub id")
    kind = teacher_kind(tcfg)
    if data is not None:
        from o2mkd_ray.config.checks import check_kinds

        check_kinds(kind, data.kind)
    if kind in TEXT_TO_IMAGE_KINDS:
        from o2mkd_ray.core.sd import check_sd_folder, require_text_to_image_extra

        require_text_to_image_extra("teacher.kind")
        if kind == "sd3":
            from o2mkd_ray.core.sd3 import check_sd3_folder

            check_sd3_folder(p)
        else:
            check_sd_folder(p, xl=kind == "stable_diffusion_xl")
    if kind in CLASS_KINDS:
        from o2mkd_ray.core.dit import check_dit_folder

        check_dit_folder(p)
    sub = tcfg.subfolder or next((s for s in ("unet", "transformer") if (p / s).is_dir()), "")
    cfg_file = p / sub / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"teacher.pretrained: {str(cfg_file)!r} not found; is {spec!r} a diffusers UNet folder?")
    _check_folder_teacher(tcfg, p, sub, kind, data, segments, students)


def _check_factory_teacher(tcfg: TeacherConfig, data, segments, students) -> None:
    """``teacher.factory``: the model it returns, its scheduler, shapes, segments and students."""
    model, scheduler = load_factory(tcfg.factory)  # a user-named factory: calling it is what they asked for
    check_prediction_type(getattr(scheduler.config, "prediction_type", "epsilon"), tcfg.factory)
    cfg = getattr(model, "config", None)
    ucfg = dict(cfg) if cfg is not None and hasattr(cfg, "keys") else {}
    _check_shapes(ucfg, data)
    T = getattr(scheduler.config, "num_train_timesteps", None)
    n = _check_segments(segments, T)
    if students is not None and n is not None:
        _check_students(students, n, lambda: model)


def _check_folder_teacher(tcfg: TeacherConfig, p: Path, sub: str, kind: str, data, segments, students) -> None:
    """A local teacher folder: its UNet class and weights, scheduler, shapes, segments and students."""
    spec = str(p)
    cfg_file = p / sub / "config.json"
    ucfg = read_json_config(cfg_file, "teacher.pretrained")
    cls = ucfg.get("_class_name", "UNet2DModel")
    want = ("DiTTransformer2DModel" if kind in CLASS_KINDS else "SD3Transformer2DModel" if kind == "sd3" else
            "UNet2DConditionModel" if kind in TEXT_TO_IMAGE_KINDS else "UNet2DModel")
    if cls != want:
        raise ConfigError(f"teacher.pretrained: {str(cfg_file)!r} describes a {cls}; a {kind} teacher folder must "
                          f"hold a diffusers {want} (wrap other models in teacher.factory='module:function')")
    _check_weights(p / sub)
    sched = _scheduler_config_file(p, tcfg.subfolder)
    if sched is None:
        raise ConfigError(f"teacher.pretrained: no scheduler config in {spec!r} (expected "
                          "scheduler/scheduler_config.json); save the teacher with its scheduler")
    scfg = read_json_config(sched, "teacher.pretrained")
    check_prediction_type(scfg.get("prediction_type", "epsilon"), str(sched))
    if kind == "unet":  # SD works in latent space: images are resized to what the VAE expects
        _check_shapes(ucfg, data)
    n = _check_segments(segments, scfg.get("num_train_timesteps", 1000))
    if students is not None and n is not None and kind in TRANSFORMER_KINDS:
        _check_transformer_students(students, n, ucfg)
    elif students is not None and n is not None:
        if students.depth is not None:
            raise ConfigError("students.depth: only transformer teachers (DiT) have blocks to drop; remove it and "
                              "use students.layers_per_block for a UNet teacher")
        _check_students(students, n, lambda: _ConfigOnly(ucfg))


def check_run(cfg) -> None:
    """All checks of a run config that need torch/diffusers, before any Ray work: registered scheduler and KD
    method names, then the teacher, segments and students (see :func:`check_teacher`)."""
    check_scheduler_name(cfg.sampling.scheduler, "sampling.scheduler")
    check_kd_method(cfg.kd.feature_method)
    check_teacher(cfg.teacher, cfg.data, segments=cfg.segments, students=cfg.students)
    kind = teacher_kind(cfg.teacher) if cfg.teacher.factory is None else "unet"
    if cfg.kd.lambda_feat > 0 and kind in TRANSFORMER_KINDS:
        family = "a DiT" if kind == "dit" else "an SD3"
        raise ConfigError(f"kd.lambda_feat: feature KD matches UNet blocks, which {family} teacher does not have; set "
                          "kd.lambda_feat=0 (output KD distils transformer students)")
    if kind in FLOW_KINDS:
        _check_flow_sampler(cfg.sampling.scheduler)
    if cfg.data.kind == "classes" and cfg.data.path and teacher_kind(cfg.teacher) in CLASS_KINDS:
        _check_class_folder(cfg)
    if cfg.eval.clip_model is not None and not Path(cfg.eval.clip_model).expanduser().is_dir():
        raise ConfigError(f"eval.clip_model: folder {cfg.eval.clip_model!r} does not exist; give a local CLIP "
                          "model folder (CLIPModel + processor) or remove it")


def _check_flow_sampler(name: str) -> None:
    """A flow-matching teacher samples with a flow-matching scheduler (its students' pipeline and samples.png)."""
    from o2mkd_ray.config.schema import SCHEDULERS

    if not SCHEDULERS.get(name.lower(), name).startswith("FlowMatch"):
        raise ConfigError(f"sampling.scheduler: {name!r} is not a flow-matching scheduler; an SD3 teacher samples "
                          "with flow_euler (FlowMatchEulerDiscreteScheduler) or flow_heun")


def _check_class_folder(cfg) -> None:
    """A DiT run's class folder: every subfolder names one of the teacher's classes and there are images."""
    from o2mkd_ray.core.dit import id2label, read_class_folder

    spec = cfg.teacher.pretrained
    if spec is None or not looks_local(spec):
        return
    sub = cfg.teacher.subfolder or "transformer"
    n = read_json_config(Path(spec).expanduser() / sub / "config.json", "teacher.pretrained").get("num_embeds_ada_norm")
    read_class_folder(cfg.data.path, id2label(spec), n if isinstance(n, int) else None)


class _ConfigOnly(nn.Module):
    """A stand-in with only a teacher's ``config`` (student shapes come from it; no weights are loaded)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config


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
    from o2mkd_ray.core.segments import Segments

    return Segments.from_config(segments, T).n


def _check_transformer_students(st, n: int, tcfg: dict) -> None:
    """Every segment's transformer student config (DiT, SD3: depth and heads kept) is valid: derived from the
    teacher's config only."""
    from o2mkd_ray.core.students import per_segment_values
    from o2mkd_ray.core.transformer_students import transformer_student_config

    for key, value in (("students.layers_per_block", st.layers_per_block), ("students.unet", st.unet),
                       ("students.transformer_layers_per_block", st.transformer_layers_per_block)):
        if value is not None:
            raise ConfigError(f"{key}: a UNet option; a DiT teacher's students are shaped by students.depth and "
                              "students.width, remove it")
    if st.drop_mid_block:
        raise ConfigError("students.drop_mid_block: a UNet option; a transformer teacher (DiT, SD3) has no mid "
                          "block, remove it")
    depths = per_segment_values(1.0 if st.depth is None else st.depth, n, "students.depth")
    for d, w in zip(depths, per_segment_values(st.width, n, "students.width")):
        transformer_student_config(tcfg, d, w)


def _check_students(st, n: int, teacher_like) -> None:
    """Every segment's student UNet config is valid: built on the meta device, so it costs no memory."""
    from o2mkd_ray.core.student_config import make_unet, student_config, teacher_unet_config
    from o2mkd_ray.core.students import per_segment_values

    widths = per_segment_values(st.width, n, "students.width")
    layers = per_segment_values(st.layers_per_block, n, "students.layers_per_block")
    with torch.device("meta"):
        if st.unet is not None:
            for lp in sorted(set(layers), key=str):
                ucfg = dict(st.unet, **({} if lp is None else {"layers_per_block": int(lp)}))
                make_unet(dict(ucfg, mid_block_type=None) if st.drop_mid_block else ucfg, "students.unet")
            return
        tcfg = teacher_unet_config(teacher_like())
        for w, lp in sorted(set(zip(widths, layers)), key=str):
            make_unet(student_config(tcfg, w, lp, drop_mid_block=st.drop_mid_block,
                                     transformer_layers_per_block=st.transformer_layers_per_block), "students.width")
