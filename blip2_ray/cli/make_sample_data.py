"""Write sample image-text shards (coloured shapes with captions that describe them).

    blip2-ray make-sample-data --out DIR --format webdataset|parquet --num N [--shards S]
        [--image-size 64] [--corrupt kind=count ...] [--num-captions K] [--seed 0] [--json]
    blip2-ray make-sample-data --out DIR --format coco-karpathy --num N [--num-test M] [--num-captions K]
        (fine-tuning data: images/train2014, images/val2014 and annotations/coco_karpathy_{train,test}.json)
    blip2-ray make-sample-data --out DIR --format vqav2 --num N [--num-test M]
        (VQA fine-tuning data in VQAv2's official layout: annotations/v2_*_{annotations,questions}.json)
    blip2-ray make-sample-data --out DIR --format instruct --num N [--num-test M]
        (instruction-tuning data: one annotation file per task, colour / shape / count / yesno / describe / chat,
        in the LAVIS VQA, LAVIS caption and LLaVA-Instruct layouts: fixtures/sample_instruct.py)
"""

from __future__ import annotations

import argparse
import json
import os

from blip2_ray.errors import UserError
from blip2_ray.runtime.cli import cli_main


def parse_corrupt(items: list[str]) -> dict[str, int]:
    from blip2_ray.fixtures.sample import CORRUPT_KINDS

    out: dict[str, int] = {}
    for item in items:
        kind, _, count = item.partition("=")
        if kind not in CORRUPT_KINDS:
            raise UserError(f"--corrupt {item!r}: unknown kind {kind!r}; valid kinds: {', '.join(CORRUPT_KINDS)}")
        try:
            out[kind] = out.get(kind, 0) + (int(count) if count else 1)
        except ValueError:
            raise UserError(f"--corrupt {item!r}: the count must be an integer, e.g. {kind}=3") from None
    return out


@cli_main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="blip2-ray make-sample-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", default="webdataset", choices=["webdataset", "parquet", "coco-karpathy", "vqav2",
                                                                 "instruct"])
    p.add_argument("--num-test", type=int, default=16, help="coco-karpathy / vqav2 / instruct: held-out images")
    p.add_argument("--num", type=int, default=100, help="good records")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--num-captions", type=int, default=1, help="captions per record (JSON list when > 1)")
    p.add_argument("--num-colours", type=int, default=6)
    p.add_argument("--num-shapes", type=int, default=4)
    p.add_argument("--corrupt", nargs="*", default=[], metavar="KIND=COUNT",
                   help="inject bad records: undecodable_image, truncated_image, small_image, bomb_image, "
                        "missing_image, missing_caption, empty_caption, bad_caption_encoding, truncated_tar, "
                        "empty_shard")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = p.parse_args(argv)

    from blip2_ray.fixtures.sample import make_sample_shards

    if args.format == "vqav2":
        from blip2_ray.fixtures.sample_vqa import make_vqav2_sample

        paths = make_vqav2_sample(args.out, args.num, args.num_test, args.image_size, args.seed, args.num_colours,
                                  args.num_shapes)
        print(json.dumps(paths) if args.json else f"wrote {args.num} training and {args.num_test} held-out images "
              f"with 2 questions each in VQAv2's official layout: {paths['train']} (+ questions), {paths['test']}")
        return 0
    if args.format == "instruct":
        from blip2_ray.fixtures.sample_instruct import make_instruct_sample

        paths = make_instruct_sample(args.out, args.num, args.num_test, args.image_size, args.seed)
        paths.pop("attributes")
        print(json.dumps(paths) if args.json else f"wrote {args.num} training and {args.num_test} held-out images with "
              f"one annotation file per instruction task under {os.path.join(args.out, 'annotations')}")
        return 0
    if args.format == "coco-karpathy":
        from blip2_ray.fixtures.sample_coco import make_coco_karpathy_sample

        paths = make_coco_karpathy_sample(args.out, args.num, args.num_test, args.image_size,
                                          max(1, args.num_captions), args.seed, args.num_colours, args.num_shapes)
        print(json.dumps(paths) if args.json else f"wrote {args.num} training and {args.num_test} held-out images "
              f"in the COCO Karpathy layout: {paths['train']}, {paths['test']}, images under {paths['image_root']}")
        return 0
    try:
        summary = make_sample_shards(
            args.out, fmt=args.format, num=args.num, shards=args.shards, image_size=args.image_size,
            seed=args.seed, corrupt=parse_corrupt(args.corrupt), num_colours=args.num_colours,
            num_shapes=args.num_shapes, num_captions=args.num_captions,
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {summary['good']} good records in {len(summary['files'])} {args.format} shards to {args.out}"
              + (f"; injected bad records: {summary['skipped']}" if summary["skipped"] else ""))
    return 0

