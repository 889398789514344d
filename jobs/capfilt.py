"""CapFilt: caption web images (nucleus sampling), keep the captions a retrieval model ranks best.

    python jobs/capfilt.py --config jobs/configs/capfilt_tiny.yaml [--set key=value ...] [--address A] [--json]
    python jobs/capfilt.py measure --filter DIR [--filter-kind blip2_itc|clip] --data SHARDS [--json]

Writes output shards with the input's file names and format: the caption member/column holds the kept
captions (a JSON list the training pipeline draws one from per visit) and a `capfilt` member/column the
scores, which captions are synthetic and which models wrote and ranked them (captioner.kind: blip2 |
blip, filter.kind: blip2_itc | clip; the paper's pair: jobs/configs/capfilt_paper.yaml, docs/capfilt.md).
A rerun skips shards already written. Prints the summary (images, captions generated, kept, share of web
captions kept, captions truncated to the filter's text limit); --json puts it on the last line.

`measure` runs the filter alone on generated sample shards whose web captions were deliberately
swapped for wrong ones, with the correct caption among the candidates, and reports how often the
filter ranks the correct caption above the wrong web caption (needs a trained filter).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip2_ray.runtime.cli import cli_main, job_parser, load_job_config  # noqa: E402
from blip2_ray.runtime.cluster import init_ray  # noqa: E402


def measure_main(argv: list[str]) -> int:
    from blip2_ray.capfilt.measure import wrong_caption_rejection

    p = argparse.ArgumentParser(prog="capfilt.py measure")
    p.add_argument("--filter", required=True, help="the filter's model directory (trained)")
    p.add_argument("--filter-kind", default="blip2_itc", choices=["blip2_itc", "clip"],
                   help="blip2_itc: a stage-1 export; clip: a CLIPModel directory")
    p.add_argument("--data", required=True, help="sample shards made by jobs/make_sample_data.py (json metadata)")
    p.add_argument("--limit", type=int, default=500, help="images to use")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = wrong_caption_rejection(args.filter, args.data, limit=args.limit, kind=args.filter_kind)
    print(f"correct caption ranked above the wrong web caption for {out['correct_kept_rate']:.1%} of "
          f"{out['images']} images (top-1 of {out['candidates']} candidates correct: {out['top1_correct_rate']:.1%})")
    if args.json:
        print(json.dumps(out))
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "measure":
        return measure_main(argv[1:])
    from blip2_ray.capfilt.config import CapFiltConfig
    from blip2_ray.capfilt.job import check_models, run_capfilt

    p = job_parser(__doc__.split("\n")[0], config_help="YAML of overrides of the CapFiltConfig defaults",
                   json_help="print the summary as one JSON line last")
    args = p.parse_args(argv)
    cfg = load_job_config(CapFiltConfig, args)
    check_models(cfg)  # before Ray starts
    init_ray(args.address, progress=args.progress)
    s = run_capfilt(cfg)
    m = s["models"]
    writer = f"{m['captioner']['kind']}:{m['captioner']['model']}" if m["captioner"] else "none"
    print(f"capfilt: {s['images']} images in {s['shards']} shards ({s['shards_done_now']} now, "
          f"{s['shards_done_before']} before); {s['captions_generated']} captions generated ({writer}), "
          f"{s['captions_kept']} kept ({m['filter']['kind']}:{m['filter']['model']}), "
          f"{s['share_of_kept_that_are_web']:.1%} of kept are web captions, {s['captions_truncated']} truncated to "
          f"the filter's text limit; skipped {s['skipped']}; output {s['output_dir']}", flush=True)
    if args.json:
        print(json.dumps(s), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
