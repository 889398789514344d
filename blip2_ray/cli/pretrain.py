"""BLIP-2 pre-training (stage 1 or 2, chosen by the config) on Ray Train + DeepSpeed ZeRO.

    blip2-ray pretrain --config jobs/configs/stage1_tiny.yaml [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 -- python jobs/pretrain.py --config ...

`--set` values are YAML (`--set data.train='[a/, b/]'`). Ray: `--address`, else RAY_ADDRESS (set by
`ray job submit`), else a new local instance (never silently another cluster on the machine). A rerun
with the same run_name resumes from its latest checkpoint.
"""

from __future__ import annotations

import os

from blip2_ray.runtime.cli import cli_main, run_config_job


@cli_main
def main(argv: list[str] | None = None) -> int:
    from blip2_ray.train.config import PretrainConfig
    from blip2_ray.train.trainer import check_inputs, run_pretrain

    cfg, _, result = run_config_job(argv, PretrainConfig, prog="blip2-ray pretrain", description=__doc__.split("\n")[0],
                                    check=check_inputs, run=run_pretrain)
    m = result.metrics or {}
    print(f"done: run {cfg.run_name} step {m.get('step', '?')} loss {m.get('loss', float('nan')):.4f}; "
          f"checkpoints under {result.path}; model exported to {os.path.abspath(cfg.output_dir)}", flush=True)
    return 0

