"""`blip2-ray pack-finetune-data` as a file, for
`ray job submit --working-dir . -- python jobs/pack_finetune_data.py ...`
(Ray puts the uploaded checkout first on the job's PYTHONPATH; elsewhere the installed package is used).
The command itself: blip2_ray/cli/pack_finetune_data.py (`blip2-ray pack-finetune-data --help`)."""

import sys

from blip2_ray.cli.pack_finetune_data import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
