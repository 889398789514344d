"""`blip2-ray capfilt` as a file, for
`ray job submit --working-dir . -- python jobs/capfilt.py ...`
(Ray puts the uploaded checkout first on the job's PYTHONPATH; elsewhere the installed package is used).
The command itself: blip2_ray/cli/capfilt.py (`blip2-ray capfilt --help`)."""

import sys

from blip2_ray.cli.capfilt import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
