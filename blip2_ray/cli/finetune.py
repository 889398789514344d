"""BLIP-2 fine-tuning (caption, retrieval, vqa) with the ViT trained, on Ray Train + DeepSpeed ZeRO.

    blip2-ray finetune --config jobs/configs/finetune_caption_tiny.yaml [--set key=value ...]
    ray job submit --address http://127.0.0.1:8265 -- python jobs/finetune.py --config ...

The annotations (LAVIS/BLIP COCO Karpathy or Flickr30k JSON + image root) are packed once into parquet shards under
<storage_path>/<run_name>/finetune_shards; the export and finetune_report.json (metrics before / after)
go to output_dir. A rerun with the same run_name resumes from its latest checkpoint (docs/finetuning.md).
"""

from __future__ import annotations

from blip2_ray.runtime.cli import cli_main, run_config_job


@cli_main
def main(argv: list[str] | None = None) -> int:
    from blip2_ray.train.finetune_config import FinetuneConfig
    from blip2_ray.train.finetune_job import check_finetune_inputs, resolve_start, run_finetune

    cfg, _, report = run_config_job(argv, FinetuneConfig, prog="blip2-ray finetune", description=__doc__.split("\n")[0],
                                    check=lambda c: check_finetune_inputs(resolve_start(c)), run=run_finetune)
    metrics = report["metrics"]
    print(f"done: run {cfg.run_name} step {report['train']['step']}; metrics {metrics}; model exported to "
          f"{report['output_dir']}", flush=True)
    return 0

