"""`blip2-ray check-data` as a file, for
`ray job submit --working-dir . -- python jobs/check_data.py ...`
(Ray puts the uploaded checkout first on the job's PYTHONPATH; elsewhere the installed package is used).
The command itself: blip2_ray/cli/check_data.py (`blip2-ray check-data --help`)."""

import sys

from blip2_ray.cli.check_data import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
