"""`python -m blip2_ray.cli <command> ...`: the same as the `blip2-ray` console command."""

import sys

from blip2_ray.cli import main

sys.exit(main())
