"""Index an image collection for search: Q-Former ITC features of every image in a FAISS index.

    blip2-ray index --config jobs/configs/index_tiny.yaml [--set key=value ...] [--address A] [--json]

Reads img2dataset shards (tar or parquet, local or s3://) with a stage-1 export in a Ray Data actor pool
and writes OUTPUT_DIR: the index (exact up to index.exact_max_images images, IVF-PQ beyond), each
image's key, caption and source shard, and the stored features. A rerun computes only the shards not
done yet and appends them, so the index grows by indexing new shards. Unreadable shards and bad records
are skipped and counted. Serve it with `blip2-ray serve --retrieval-model MODEL --search-index OUTPUT_DIR`
(POST /v1/search; docs/search.md). Prints the summary; --json puts it on the last line.
"""

from __future__ import annotations

import json
import os

# before torch loads its OpenMP runtime: FAISS builds the index on it here (blip2_ray/search/index.py FAISS_ENV)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from blip2_ray.runtime.cli import cli_main, run_config_job  # noqa: E402


@cli_main
def main(argv: list[str] | None = None) -> int:
    from blip2_ray.search.config import IndexJobConfig
    from blip2_ray.search.job import plan, run_index

    # plan: a missing model or source, or an index of another model, is one sentence before Ray starts
    _, args, s = run_config_job(argv, IndexJobConfig, prog="blip2-ray index", description=__doc__.split("\n")[0],
                                check=plan, run=run_index, json_help="print the summary as one JSON line last")
    rate = f" ({s['images_per_s']} images/s)" if s["images_per_s"] else ""
    print(f"index: {s['images']} images from {s['shards_in_index']} shards ({s['shards_done_now']} computed now, "
          f"{s['shards_done_before']} before; {s['shards_unreadable']} unreadable); skipped {s['skipped']}; "
          f"{s['kind']} ({s['factory']}), {s['index_bytes_per_image']:.0f} index bytes per image; "
          f"features of {s['images_now']} images in {s['feature_seconds']:.1f} s{rate}; output {s['output_dir']}",
          flush=True)
    if args.json:
        print(json.dumps(s), flush=True)
    return 0
