"""Everything a tune search checks and settles before any Ray work: output folders, the configs, the space, the
search's identity file.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

from o2mkd_ray.config.loading import from_dict
from o2mkd_ray.config.schema import Config
from o2mkd_ray.core.atomic import write_json
from o2mkd_ray.errors import ConfigError
from o2mkd_ray.tune.resolve import apply_budget, to_builtin
from o2mkd_ray.tune.space import SearchSpace, check_space, check_students, load_space

# Config keys the engine's pre-flight (o2mkd_ray.engine.session.preflight) checks against files, installed
# packages or the teacher. The search runs those checks once on the base and the budgeted config; a trial checks
# its own segments (resolve_trial_config) and student shapes (sampling_cost builds them), so only a space that
# tunes one of the others makes every trial run the pre-flight again.
PREFLIGHT_KEYS = ("teacher.", "data.", "students.", "sampling.scheduler", "kd.feature_method", "eval.clip_model")


CHECKED_BY_TRIAL = ("students.width", "students.layers_per_block")


def experiment_dir(out: Path) -> Path:
    """Where Tune keeps the search under the output folder ``out`` (what ``Tuner.restore`` reads)."""
    return out / "tune" / "ray" / "tune"


@dataclasses.dataclass
class SearchPlan:
    """A checked search: its space, configs, teacher, folders and first points.

    ``base`` is the full-budget config dict (for ``best.yaml``), ``trial_base`` the one trials start from (the
    space's ``budget:`` applied); ``T`` and ``shape`` are the teacher's timesteps and sample shape.
    """

    space: SearchSpace
    cfg: Config
    base: dict
    trial_base: dict
    T: int
    teacher: object
    shape: tuple
    out: Path
    restoring: bool
    num_samples: int
    points: list[dict] = dataclasses.field(default_factory=list)

    @property
    def tdir(self) -> Path:
        return self.out / "tune"

    @property
    def exp_dir(self) -> Path:
        return experiment_dir(self.out)

    @property
    def trial_cfg(self) -> Config:
        return from_dict(self.trial_base)

    @property
    def ident(self) -> dict:
        """What makes it the same search (not placement or tracking): the run's hash and the space."""
        from o2mkd_ray.distill.run_folder import run_hash

        return {"run": run_hash(self.base), "space": self.space.raw}


def trials_need_preflight(space: SearchSpace) -> bool:
    """Whether every trial must run the engine's pre-flight itself.

    Args:
        space: the search's space.
    Returns:
        True when it tunes a key that only that pre-flight checks (see :data:`PREFLIGHT_KEYS`).
    """
    return any(k.startswith(PREFLIGHT_KEYS) and k not in CHECKED_BY_TRIAL for k in space.params)


def _restoring(out: Path, resume: bool) -> bool:
    # whether out/tune holds a search to continue; refuses a file, or such a folder without resume
    from ray import tune

    exp_dir = experiment_dir(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; give a folder")
    restoring = exp_dir.is_dir() and tune.Tuner.can_restore(exp_dir)
    if restoring and not resume:
        raise ConfigError(f"--out {str(out)!r} already holds a tune search ({exp_dir}); drop --no-resume to "
                          "continue it, or use a new --out")
    return restoring


def check_configs(*cfgs: Config) -> None:
    """The engine's pre-flight checks of each distinct config (no output folder), once for the whole search.

    Args:
        cfgs: e.g. the base config and the budgeted one trials start from.
    Raises:
        ConfigError: ``teacher.replicas: per_node``, or what the pre-flight rejects (for a text-to-image teacher
            also a missing ``sd`` extra, an incomplete model folder or a bad prompts file).
    """
    from o2mkd_ray.core.teacher_checks import check_run
    from o2mkd_ray.data.build import check_data

    seen = []
    for cfg in cfgs:
        if cfg.to_dict() in seen:
            continue
        seen.append(cfg.to_dict())
        if cfg.teacher.mode == "actor" and cfg.teacher.replicas == "per_node":
            # a trial's teacher actors live in its placement group, which is sized from a number of replicas
            raise ConfigError("teacher.replicas: per_node is for distill on a cluster; give tune a number of "
                              "replicas, e.g. teacher.replicas=1")
        check_run(cfg)
        check_data(cfg.data)


def check_algorithm(algorithm: str) -> None:
    """Raises ConfigError when a search algorithm's package (optuna, hyperopt) is not installed."""
    if algorithm in ("optuna", "hyperopt") and importlib.util.find_spec(algorithm) is None:
        raise ConfigError(f"search.algorithm={algorithm} needs `pip install {algorithm}`")


def plan_search(cfg: Config, space, out: str | Path, num_samples: int | None, resume: bool) -> SearchPlan:
    """Checks a search before any Ray work and loads its teacher.

    Args:
        cfg: the base config; space: a space file, mapping or :class:`SearchSpace`; out: the output folder;
        num_samples: trials (None: ``search.num_samples``); resume: whether an existing search may continue.
    Returns:
        The plan (no points yet: see :func:`claim_folder`).
    Raises:
        ConfigError: a bad space, config or output folder, a missing search package, or an ``out`` that holds
            another search.
    """
    from o2mkd_ray.core.teacher import load_teacher, sample_shape

    sp = load_space(space)
    out = Path(out).expanduser().resolve()
    restoring = _restoring(out, resume)
    base = cfg.to_dict()
    trial_base = apply_budget(base, sp.budget)
    check_configs(cfg, from_dict(trial_base))
    teacher, scheduler = load_teacher(cfg.teacher)
    T = int(scheduler.config.num_train_timesteps)
    check_space(sp, trial_base, T)
    check_space(sp, base, T)
    check_students(sp, teacher, trial_base)
    plan = SearchPlan(sp, cfg, base, trial_base, T, teacher, sample_shape(teacher, cfg.data.channels,
                                                                          cfg.data.resolution),
                      out, restoring, num_samples or sp.search["num_samples"])
    _check_identity(plan)
    check_algorithm(sp.search["algorithm"])
    return plan


def _check_identity(plan: SearchPlan) -> None:
    f = plan.tdir / "tune.json"
    if f.is_file() and json.loads(f.read_text()).get("ident") != json.loads(json.dumps(plan.ident)):
        raise ConfigError(f"--out {str(plan.out)!r} holds a tune search with another config or space; use a new "
                          "--out")


def claim_folder(plan: SearchPlan, points: list[dict]) -> None:
    """Creates ``OUT/tune`` and writes ``tune.json`` (the search's identity, trials and first points).

    Args:
        plan: the checked search; points: its ``points_to_evaluate`` (kept in the plan, at most ``num_samples``:
            Tune would run every point even beyond it).
    """
    plan.points = points[:plan.num_samples]
    plan.tdir.mkdir(parents=True, exist_ok=True)
    write_json(plan.tdir / "tune.json", {"ident": plan.ident, "num_samples": plan.num_samples,
                                         "points_to_evaluate": plan.points}, default=to_builtin)
