"""Ray internals sit behind engine.ray_compat: each one works on the tested Ray and fails with one clear message
when the installed Ray moved it or is outside the tested range."""

from __future__ import annotations

import sys

import pytest
import ray

from o2mkd_ray.engine import ray_compat


def test_internals_resolve_on_the_tested_ray():
    ray_compat.check_ray_version()
    base = ray_compat.controller_callback_base()
    assert isinstance(base, type) and hasattr(base, "after_controller_start")


def test_an_untested_ray_is_refused_with_what_to_install(monkeypatch):
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    monkeypatch.delenv("O2MKD_ALLOW_UNTESTED_RAY", raising=False)
    with pytest.raises(ray_compat.RayInternalsMoved, match=r"Ray 2.61.0 is untested .*tested: 2.60-2.60.*pip install"):
        ray_compat.check_ray_version()
    monkeypatch.setenv("O2MKD_ALLOW_UNTESTED_RAY", "1")
    ray_compat.check_ray_version()


@pytest.mark.parametrize(("module", "call"), [
    ("ray.train.v2._internal.execution.callback", ray_compat.controller_callback_base),
    ("ray._private.services", lambda: ray_compat.bootstrap_address("auto")),
])
def test_a_moved_internal_names_itself_and_the_tested_ray(monkeypatch, module, call):
    monkeypatch.setitem(sys.modules, module, None)  # as if this Ray had no such module
    with pytest.raises(ray_compat.RayInternalsMoved, match=rf"has no {module.replace('.', '[.]')}.*tested with Ray 2.60"):
        call()
