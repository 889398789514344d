"""`blip2-ray serve` as a file, for
`ray job submit --working-dir . -- python jobs/serve.py ...`
(Ray puts the uploaded checkout first on the job's PYTHONPATH; elsewhere the installed package is used).
The command itself: blip2_ray/cli/serve.py (`blip2-ray serve --help`)."""

import sys

from blip2_ray.cli.serve import load_serve_config, main, parse_args

__all__ = ["load_serve_config", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
