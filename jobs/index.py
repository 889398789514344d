"""`blip2-ray index` as a file, for
`ray job submit --working-dir . -- python jobs/index.py ...`
(Ray puts the uploaded checkout first on the job's PYTHONPATH; elsewhere the installed package is used).
The command itself: blip2_ray/cli/index.py (`blip2-ray index --help`)."""

import sys

from blip2_ray.cli.index import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
