"""`blip2-ray pretrain` as a file, for
`ray job submit --working-dir . -- python jobs/pretrain.py ...`
(Ray puts the uploaded checkout first on the job's PYTHONPATH; elsewhere the installed package is used).
The command itself: blip2_ray/cli/pretrain.py (`blip2-ray pretrain --help`)."""

import sys

from blip2_ray.cli.pretrain import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
