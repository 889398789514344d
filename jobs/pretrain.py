"""BLIP-2 pre-training (stage 1 or 2, chosen by the config) on Ray Train + DeepSpeed ZeRO.

    python jobs/pretrain.py --config jobs/configs/stage1_tiny.yaml [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 -- python jobs/pretrain.py --config ...

`--set` values are YAML (`--set data.train='[a/, b/]'`). Ray: `--address`, else RAY_ADDRESS (set by
`ray job submit`), else a new local instance (never silently another cluster on the machine). A rerun
with the same run_name resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip2_ray.runtime.cli import cli_main, job_parser, load_job_config  # noqa: E402
from blip2_ray.runtime.cluster import init_ray  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    from blip2_ray.train.config import PretrainConfig
    from blip2_ray.train.trainer import check_inputs, run_pretrain

    p = job_parser(__doc__.split("\n")[0], config_help="YAML of overrides of the PretrainConfig defaults")
    args = p.parse_args(argv)
    cfg = load_job_config(PretrainConfig, args)
    check_inputs(cfg)  # before any worker: bad paths are one sentence, not a Ray traceback
    init_ray(args.address, progress=args.progress)
    result = run_pretrain(cfg)
    m = result.metrics or {}
    print(f"done: run {cfg.run_name} step {m.get('step', '?')} loss {m.get('loss', float('nan')):.4f}; "
          f"checkpoints under {result.path}; model exported to {os.path.abspath(cfg.output_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
