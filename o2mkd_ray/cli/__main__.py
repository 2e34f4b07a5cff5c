"""``python -m o2mkd_ray.cli``: the ``o2mkd-ray`` command."""

import sys

from o2mkd_ray.cli.main import main

sys.exit(main())
