"""`blip2-ray finetune` as a file, for
`ray job submit --working-dir . -- python jobs/finetune.py ...`
(Ray puts the uploaded checkout first on the job's PYTHONPATH; elsewhere the installed package is used).
The command itself: blip2_ray/cli/finetune.py (`blip2-ray finetune --help`)."""

import sys

from blip2_ray.cli.finetune import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
