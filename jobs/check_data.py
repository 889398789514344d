"""Check a dataset before spending GPU hours on it: stream every record through the decode/validate path.

    python jobs/check_data.py SOURCE... [--json] [--address ADDR] [--set data.key=value ...]

Runs on the Ray cluster at --address (or RAY_ADDRESS), else on a new local instance; prints the good
records and the skipped ones by reason. With --json the last line is
{"ok": N, "skipped": {"<reason>": count, ...}, "files": F}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip2_ray.errors import UserError, cli_main  # noqa: E402


def check_sources(sources: list[str], cfg) -> dict:
    """Stream `sources` through the pipeline's decode/validate path; {"ok", "skipped", "files"}."""
    from blip2_ray.data.pipeline import build_dataset, get_skip_counts, reset_skip_counts, resolve_sources

    files = resolve_sources(sources, cfg)  # a missing path fails here, before any work
    tag = f"check-{os.getpid()}-{time.time_ns()}"
    ds = build_dataset(cfg, sources, train=False, qformer_tokenizer=None, llm_tokenizer=None,
                       skip_tag=tag, with_pixels=False)
    ok = 0
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ok += batch.num_rows
    except Exception as e:
        cause = _user_error_in(e)
        if cause is not None:
            raise cause from None
        raise
    skipped = get_skip_counts(tag)
    reset_skip_counts(tag)
    return {"ok": ok, "skipped": dict(sorted(skipped.items())), "files": len(files)}


def _user_error_in(e: BaseException) -> UserError | None:
    """The UserError a Ray task raised, if that is what `e` wraps (Ray adds several layers)."""
    import re

    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, UserError):
            m = re.search(r"UserError: (.+)", str(e))
            return UserError(m.group(1).strip() if m else str(e).strip().splitlines()[0])
        e = e.__cause__ or getattr(e, "cause", None) or e.__context__
        seen += 1
    return None


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="shard files, directories, globs or s3:// URIs")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the counts")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else a new local instance)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="data config override, e.g. --set image_keys=[jpg] --set s3_endpoint_url=http://...")
    args = p.parse_args(argv)

    from blip2_ray.config import from_dict, parse_set
    from blip2_ray.data.config import DataConfig

    overrides: dict = {}
    for item in args.sets:
        for k, v in parse_set(item.removeprefix("data.")).items():
            overrides[k] = v
    cfg = from_dict(DataConfig, overrides)

    from blip2_ray.data.pipeline import resolve_sources

    resolve_sources(args.sources, cfg)  # fail on a bad path before starting Ray

    import ray

    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        result = check_sources(args.sources, cfg)
    finally:
        ray.shutdown()
    print(f"{result['ok']} good records in {result['files']} files")
    for reason, count in result["skipped"].items():
        print(f"skipped {count} ({reason})")
    if args.json:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
