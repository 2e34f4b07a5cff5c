"""The ``o2mkd-ray`` command line. ``o2mkd_ray.cli:main`` is the console script's entry point (as it has been since
the first release, so console scripts installed by earlier versions keep working)."""

from o2mkd_ray.cli.main import main

__all__ = ["main"]
