"""`blip2-ray make-sample-data` as a file, for
`ray job submit --working-dir . -- python jobs/make_sample_data.py ...`
(Ray puts the uploaded checkout first on the job's PYTHONPATH; elsewhere the installed package is used).
The command itself: blip2_ray/cli/make_sample_data.py (`blip2-ray make-sample-data --help`)."""

import sys

from blip2_ray.cli.make_sample_data import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
