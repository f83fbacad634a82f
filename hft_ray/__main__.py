"""`python -m hft_ray ...`: the command line, as a cluster job runs it."""

import sys

from hft_ray.cli import main

sys.exit(main())
