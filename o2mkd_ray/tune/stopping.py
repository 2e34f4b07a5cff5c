"""Stopping a trial's Train runs when Tune stops the trial, before Tune frees the trial's resources.

Each segment trainer of a trial is a Ray Train run driven by a controller actor that owns its worker group's
placement group. Tune stops a trial (ASHA) by calling its trainable's ``stop()``, which runs ``cleanup()``, and
then removes the trial's placement group. A controller that is merely killed leaks a worker group that is still
pending or being retried: the group gets placed later and holds its CPUs for the rest of the search. So every
trial has a :class:`TrialState`, and the trainable's cleanup aborts the controllers properly.

The state lives in a small actor (:class:`TrialRegistry`, 0 CPU) named after the trial id. The trainable
(:class:`StopTrainersOnCleanup`) creates it in ``setup()`` and keeps the handle, which keeps the actor alive
until the trial's actor ends (Ray removes an actor, named or not, once no handle to it is left). The trial
function runs in a thread of the same actor but only knows its trial id, so it finds the state by that name.
Neither side keeps anything in module globals. Tune runs each trial in its own actor (no actor reuse) and trial
ids are unique within a search, so the name is unique too.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from o2mkd_ray.core.atomic import write_json

log = logging.getLogger(__name__)


STOP_TIMEOUT_S = 30.0  # cleanup's wait for the aborted controllers, on top of the worker-group start-up timeout


TRIAL_START_TIMEOUT_S = "15"  # a trial's worker-group start-up timeout: how long a pending group can delay a stop


STOP_FILE = "stopped_trainers.json"  # written into the trial's folder by a cleanup that found live trainers


STOP_OUTCOMES = ("aborted", "ended", "timeout", "error")


class TrialRegistry:
    """Ray actor (0 CPU, one per trial, named after it): the trial's folder, teacher actor names, stop flag and
    live Train controllers (``actor_id -> handle``)."""

    def __init__(self):
        self.out: str | None = None
        self.teachers: list[str] = []
        self.handles: dict = {}
        self.stop_requested = False

    def record(self, out: str, teachers: list[str]) -> None:
        self.out, self.teachers = out, list(teachers)

    def describe(self) -> dict:
        return {"out": self.out, "teachers": self.teachers}

    def request_stop(self) -> None:
        self.stop_requested = True

    def stopping(self) -> bool:
        return self.stop_requested

    def add(self, actor_id: str, handle) -> None:
        self.handles[actor_id] = handle

    def remove(self, actor_id: str) -> None:
        self.handles.pop(actor_id, None)  # a finished run: drop the handle so that the controller can exit

    def get(self) -> dict:
        return dict(self.handles)


def registry_name(trial_id: str) -> str:
    """The name of a trial's :class:`TrialRegistry` actor."""
    return f"o2mkd-trial-{trial_id}"


def controller_callback(registry):
    """A Train ``ControllerCallback`` that adds its controller to ``registry`` at start, removes it at the end, and
    ends the run instead of starting a worker group once the trial is stopping.

    The class is made here because its base class comes from Ray Train, which is heavy to import.
    """
    import ray

    from o2mkd_ray.engine.ray_compat import controller_callback_base

    class RegisterController(controller_callback_base()):
        def __init__(self, registry):
            self.registry = registry

        def after_controller_start(self, train_run_context) -> None:
            ctx = ray.get_runtime_context()
            try:
                ray.get(self.registry.add.remote(ctx.get_actor_id(), ctx.current_actor), timeout=30)
            except Exception as e:  # noqa: BLE001 - registration must never fail training
                log.warning("could not register the Train controller with the trial: %s", e)

        def before_controller_execute_resize_decision(self, resize_decision) -> None:
            # Runs in the control loop before each attempt to start the worker group. A controller whose group is
            # still waiting for CPUs never yields to an abort() call (that loop has no await), but its wait times
            # out, removing the pending group, and comes back here: a stopped trial ends the run instead.
            try:
                stop = ray.get(self.registry.stopping.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - registry gone: the trial is gone
                stop = True
            if stop:
                raise RuntimeError("the Tune trial was stopped: not starting the worker group")

        def after_controller_finish(self, result) -> None:
            try:
                ray.get(self.registry.remove.remote(ray.get_runtime_context().get_actor_id()), timeout=30)
            except Exception:  # noqa: BLE001
                pass

    return RegisterController(registry)


class TrialState:
    """A trial's shared state: a handle on its :class:`TrialRegistry`.

    Args:
        trial_id: the Tune trial id; registry: the registry actor's handle.
    """

    def __init__(self, trial_id: str, registry):
        self.trial_id, self.registry = trial_id, registry

    @classmethod
    def open(cls, trial_id: str) -> TrialState:
        """The trial's state, its registry actor created if it does not exist yet.

        Args:
            trial_id: the trial.
        Returns:
            The state (the same registry for every caller with this trial id while one of them holds it).
        """
        import ray

        registry = ray.remote(num_cpus=0)(TrialRegistry).options(name=registry_name(trial_id),
                                                                  get_if_exists=True).remote()
        return cls(trial_id, registry)

    def record(self, out: Path, teachers: list[str]) -> None:
        """Records the trial's run folder and teacher actor names (the trial function knows them, the cleanup
        needs them)."""
        import ray

        ray.get(self.registry.record.remote(str(out), list(teachers)), timeout=60)

    def recorded(self) -> tuple[Path | None, list[str]]:
        """The run folder (None until recorded) and teacher actor names."""
        import ray

        info = ray.get(self.registry.describe.remote(), timeout=60)
        return (Path(info["out"]) if info["out"] else None), info["teachers"]

    def train_callbacks(self) -> list:
        """The Ray Train run callbacks that hook every segment trainer of the trial into its registry."""
        return [controller_callback(self.registry)]

    def stopping(self) -> bool:
        """Whether Tune is stopping the trial (also True when the registry is gone: the trial is going)."""
        import ray

        try:
            return bool(ray.get(self.registry.stopping.remote(), timeout=10))
        except Exception:  # noqa: BLE001
            return True

    def stop_trainers(self, timeout_s: float | None = None) -> dict:
        """Aborts the trial's Train controllers, waits (bounded) until they are gone, then kills its teacher actors.

        Runs in the trial's actor (the trainable's cleanup). The registry stays, flagged as stopping, until the
        trial's actor ends: a segment trainer that the trial function starts after this point gives up at once.

        Args:
            timeout_s: the longest wait; default :data:`STOP_TIMEOUT_S` plus the worker-group start-up timeout.
        Returns:
            How many controllers ended each way (:data:`STOP_OUTCOMES`); also written to the trial's
            ``stopped_trainers.json`` when there were any.
        """
        import ray

        if timeout_s is None:
            timeout_s = STOP_TIMEOUT_S + float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
        try:
            ray.get(self.registry.request_stop.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001
            log.warning("trial cleanup: cannot reach the controller registry: %s", e)
        done = _abort_controllers(self.registry, time.monotonic() + timeout_s)
        out, teachers = self.recorded()
        for name in teachers:
            _kill(name)
        counts = {s: list(done.values()).count(s) for s in STOP_OUTCOMES}
        if done and out is not None:
            try:
                out.mkdir(parents=True, exist_ok=True)
                write_json(out / STOP_FILE, counts, indent=None)
            except OSError:
                pass
        return counts


def _abort_controllers(registry, deadline: float) -> dict[str, str]:
    # Aborts every registered controller (again for ones that register meanwhile) until none is left or the
    # deadline passes; a controller that did not end by its abort is killed. Returns actor id -> outcome.
    import ray

    done: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            live = ray.get(registry.get.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001
            log.warning("trial cleanup: cannot read the controller registry: %s", e)
            break
        new = {i: h for i, h in live.items() if i not in done}
        if not new:
            break
        refs = {i: h.abort.remote() for i, h in new.items()}
        for i, ref in refs.items():
            done[i] = _await_abort(i, ref, deadline)
            if done[i] != "aborted":
                _kill(new[i])
    return done


def _await_abort(actor_id: str, ref, deadline: float) -> str:
    # how one controller's abort() call ended: see STOP_OUTCOMES
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        ray.get(ref, timeout=max(0.1, deadline - time.monotonic()))
        return "ended"  # the run had ended (finished, or gave up starting: see controller_callback)
    except RayActorError:
        return "aborted"  # the controller removed its worker group, then exited
    except GetTimeoutError:
        log.warning("trial cleanup: Train controller %s did not stop in time", actor_id)
        return "timeout"
    except Exception as e:  # noqa: BLE001
        log.warning("trial cleanup: aborting Train controller %s failed: %s", actor_id, e)
        return "error"


def _kill(actor) -> None:
    # an actor handle or name; one that was never started or is already gone is fine
    import ray

    try:
        ray.kill(ray.get_actor(actor) if isinstance(actor, str) else actor, no_restart=True)
    except Exception:  # noqa: BLE001
        pass


class StopTrainersOnCleanup:
    """Mixin for :func:`o2mkd_ray.tune.trial.run_trial`'s FunctionTrainable (``run_trial.__mixins__``).

    ``setup()`` opens the trial's :class:`TrialState` and keeps it (``self.trial_state``) for the trainable's
    life; ``cleanup()``, which Tune runs (via ``stop()``) before it removes the trial's placement group, stops the
    trial's trainers.
    """

    def setup(self, config):
        self.trial_state = TrialState.open(self.trial_id)
        super().setup(config)

    def cleanup(self):
        try:
            self.trial_state.stop_trainers()
        except Exception as e:  # noqa: BLE001 - never keep Tune from stopping the trial
            log.warning("trial cleanup failed: %s", e)
        finally:
            super().cleanup()
