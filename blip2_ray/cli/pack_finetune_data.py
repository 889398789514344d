"""Pack a fine-tuning config's training data into the parquet shards its job trains on, without Ray.

    blip2-ray pack-finetune-data --config jobs/configs/finetune_instruct_flant5xl.yaml [--set key=value ...]

The shards go where `blip2-ray finetune` with the same config looks for them (<storage_path>/<run_name>/
finetune_shards; task instruct: one folder per held-in source, mixed by sqrt(size) weights), so the job reuses
them; run it on a machine near the images, once. Bad records are counted per reason and skipped (task instruct:
no image, missing image file, empty response, empty instruction, template without its placeholder).
"""

from __future__ import annotations

import json

from blip2_ray.runtime.cli import cli_main, job_parser, load_job_config


@cli_main
def main(argv: list[str] | None = None) -> int:
    from blip2_ray.train.finetune_config import FinetuneConfig
    from blip2_ray.train.finetune_job import absolute_annotation_paths, prepare_shards, resolve_start
    from blip2_ray.train.tasks import task_of
    from blip2_ray.train.trainer import absolute_paths

    p = job_parser(__doc__.split("\n")[0], prog="blip2-ray pack-finetune-data",
                   config_help="YAML of overrides of the FinetuneConfig defaults")
    args = p.parse_args(argv)
    cfg = resolve_start(absolute_annotation_paths(absolute_paths(load_job_config(FinetuneConfig, args))))
    ann = task_of(cfg).read_annotations(cfg)
    _, manifest = prepare_shards(cfg, ann)
    summary = {k: manifest[k] for k in ("rows", "images", "missing_images") if k in manifest}
    if "sources" in manifest:
        summary["sources"] = manifest["sources"]
    print(json.dumps(summary, indent=1), flush=True)
    return 0
