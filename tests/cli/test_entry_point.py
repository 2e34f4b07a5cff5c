"""The console script's entry point resolves to the CLI's main function, under the name every release has used."""

from __future__ import annotations

import importlib
import tomllib

from conftest import ROOT


def test_console_script_entry_point_is_the_cli_main_function():
    from o2mkd_ray.cli.main import main

    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["o2mkd-ray"]
    assert target == "o2mkd_ray.cli:main"  # what console scripts installed by earlier versions import
    module, attr = target.split(":")
    assert getattr(importlib.import_module(module), attr) is main and callable(main)


def test_the_entry_point_runs(capsys):
    import pytest

    from o2mkd_ray.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "distill" in capsys.readouterr().out
