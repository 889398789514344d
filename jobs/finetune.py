"""BLIP-2 fine-tuning (caption, retrieval; vqa not yet) with the ViT trained, on Ray Train + DeepSpeed ZeRO.

    python jobs/finetune.py --config jobs/configs/finetune_caption_tiny.yaml [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 -- python jobs/finetune.py --config ...

The annotations (LAVIS/BLIP COCO Karpathy or Flickr30k JSON + image root) are packed once into parquet shards under
<storage_path>/<run_name>/finetune_shards; the export and finetune_report.json (metrics before / after)
go to output_dir. A rerun with the same run_name resumes from its latest checkpoint (docs/finetuning.md).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip2_ray.runtime.cli import cli_main, job_parser, load_job_config  # noqa: E402
from blip2_ray.runtime.cluster import init_ray  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    from blip2_ray.train.finetune_config import FinetuneConfig
    from blip2_ray.train.finetune_job import check_finetune_inputs, resolve_start, run_finetune

    p = job_parser(__doc__.split("\n")[0], config_help="YAML of overrides of the FinetuneConfig defaults")
    args = p.parse_args(argv)
    cfg = load_job_config(FinetuneConfig, args)
    check_finetune_inputs(resolve_start(cfg))  # before Ray: bad paths are one sentence, not a Ray traceback
    init_ray(args.address, progress=args.progress)
    report = run_finetune(cfg)
    metrics = report["metrics"]
    print(f"done: run {cfg.run_name} step {report['train']['step']}; metrics {metrics}; model exported to "
          f"{report['output_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
