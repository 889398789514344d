"""Check a dataset before spending GPU hours on it: stream every record through the decode/validate path.

    blip2-ray check-data SOURCE... [--json] [--address ADDR] [--set data.key=value ...]

Runs on the Ray cluster at --address (or RAY_ADDRESS), else on a new local instance; prints the good
records and the skipped ones by reason. With --json the last line is
{"ok": N, "skipped": {"<reason>": count, ...}, "files": F}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from blip2_ray.runtime.cli import cli_main, job_parser
from blip2_ray.runtime.cluster import init_ray


def check_sources(sources: list[str], cfg) -> dict:
    """Stream `sources` through the pipeline's decode/validate path; {"ok", "skipped", "files"}."""
    from blip2_ray.data.pipeline import build_dataset, resolve_sources
    from blip2_ray.data.skips import get_skip_counts, reset_skip_counts
    from blip2_ray.runtime.user_errors import reraise_user_errors

    files = resolve_sources(sources, cfg)  # a missing path fails here, before any work
    tag = f"check-{os.getpid()}-{time.time_ns()}"
    ds = build_dataset(cfg, sources, train=False, qformer_tokenizer=None, llm_tokenizer=None,
                       skip_tag=tag, with_pixels=False)
    ok = 0
    with reraise_user_errors():  # e.g. a later parquet file without the configured column
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ok += batch.num_rows
    skipped = get_skip_counts(tag)
    reset_skip_counts(tag)
    return {"ok": ok, "skipped": dict(sorted(skipped.items())), "files": len(files)}


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = job_parser(__doc__, prog="blip2-ray check-data", formatter_class=argparse.RawDescriptionHelpFormatter,
                   set_help="data config override, e.g. --set image_keys=[jpg] --set s3_endpoint_url=http://...",
                   json_help="end with one JSON line of the counts")
    p.add_argument("sources", nargs="+", help="shard files, directories, globs or s3:// URIs")
    args = p.parse_args(argv)

    from blip2_ray.config import from_dict, merge, parse_set
    from blip2_ray.data.config import DataConfig

    overrides: dict = {}
    for item in args.set:
        overrides = merge(overrides, parse_set(item.removeprefix("data.")))
    cfg = from_dict(DataConfig, overrides)

    from blip2_ray.data.pipeline import resolve_sources

    resolve_sources(args.sources, cfg)  # fail on a bad path before starting Ray

    import ray

    own = init_ray(args.address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                   progress=args.progress)
    try:
        result = check_sources(args.sources, cfg)
    finally:
        if own:  # a cluster it joined keeps running
            ray.shutdown()
    print(f"{result['ok']} good records in {result['files']} files")
    for reason, count in result["skipped"].items():
        print(f"skipped {count} ({reason})")
    if args.json:
        print(json.dumps(result), flush=True)
    return 0

