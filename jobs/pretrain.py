"""BLIP-2 pre-training (stage 1 or 2, chosen by the config) on Ray Train + DeepSpeed ZeRO.

    python jobs/pretrain.py --config jobs/configs/stage1_tiny.yaml [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 -- python jobs/pretrain.py --config ...

`--set` values are YAML (`--set data.train='[a/, b/]'`). Ray: `--address`, else RAY_ADDRESS (set by
`ray job submit`), else a new local instance (never silently another cluster on the machine). A rerun
with the same run_name resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from blip2_ray.config import load_config
from blip2_ray.errors import cli_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="YAML of overrides of the PretrainConfig defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one key (repeatable)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local instance)")
    return p.parse_args(argv)


def init_ray(address: str | None) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}
    if address:
        ray.init(address=address, runtime_env=env)
    else:
        ray.init(address="local", runtime_env=env)


@cli_main
def main(argv: list[str] | None = None) -> int:
    from blip2_ray.train.config import PretrainConfig
    from blip2_ray.train.trainer import check_inputs, run_pretrain

    args = parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.set)
    check_inputs(cfg)  # before any worker: bad paths are one sentence, not a Ray traceback
    init_ray(args.address)
    result = run_pretrain(cfg)
    m = result.metrics or {}
    print(f"done: run {cfg.run_name} step {m.get('step', '?')} loss {m.get('loss', float('nan')):.4f}; "
          f"checkpoints under {result.path}; model exported to {os.path.abspath(cfg.output_dir)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
