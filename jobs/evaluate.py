"""`blip2-ray evaluate` as a file, for
`ray job submit --working-dir . -- python jobs/evaluate.py ...`
(Ray puts the uploaded checkout first on the job's PYTHONPATH; elsewhere the installed package is used).
The command itself: blip2_ray/cli/evaluate.py (`blip2-ray evaluate --help`)."""

import sys

from blip2_ray.cli.evaluate import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
