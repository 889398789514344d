"""Zero-shot evaluation of BLIP-2 models as Ray Data batch jobs, and scoring of ready-made predictions.

    python jobs/evaluate.py --config jobs/configs/eval_retrieval_tiny.yaml [--set key=value ...] [--address A]
    python jobs/evaluate.py caption-metrics --predictions P.json --references R.json [--json]

The config's `task` picks retrieval (stage-1 model: ITC over all pairs, top-k re-ranked by ITM + ITC,
Recall@1/5/10 both ways), caption (stage-2 model: BLEU-4, CIDEr-D, METEOR/SPICE where Java allows) or
vqa (stage-2 model: VQAv2 accuracy; OK-VQA / GQA formats). It writes a JSON report (`output`) and
prints a table; with --json the last line is the report's metrics as JSON.

caption-metrics scores predictions made elsewhere: P.json is a COCO result file
([{"image_id", "caption"}]), R.json COCO caption annotations (or a Karpathy split / {id: [captions]}).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blip2_ray.runtime.cli import cli_main, job_parser, load_job_config  # noqa: E402
from blip2_ray.runtime.cluster import init_ray  # noqa: E402


def format_table(metrics: dict[str, float], title: str = "") -> str:
    """Metrics as a two-column text table (values x100 for scores in [0, 1] named BLEU/CIDEr/METEOR/SPICE)."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    w = max([len(k) for k, _ in rows] + [6])
    lines = [title] if title else []
    lines += [f"{k:<{w}}  {v:>10}" for k, v in rows]
    return "\n".join(lines)


def caption_metrics_main(argv: list[str]) -> int:
    from blip2_ray.eval.caption_metrics import caption_scores, load_predictions, load_references

    p = argparse.ArgumentParser(prog="evaluate.py caption-metrics",
                                description="BLEU-1..4 and CIDEr-D (+ METEOR/SPICE with Java) of COCO-format captions")
    p.add_argument("--predictions", required=True, help="COCO result JSON [{image_id, caption}]")
    p.add_argument("--references", required=True, help="COCO caption annotations JSON (or Karpathy split)")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON line last")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR even where Java is available")
    p.add_argument("--spice", action="store_true", help="require SPICE (needs its Stanford CoreNLP jars)")
    args = p.parse_args(argv)
    preds = load_predictions(args.predictions)
    refs = load_references(args.references)
    scores = caption_scores(refs, preds, meteor=False if args.no_meteor else None, spice=True if args.spice else False)
    print(format_table(scores, f"caption metrics: {len(preds)} images"), flush=True)
    if args.json:
        print(json.dumps(scores), flush=True)
    return 0


@cli_main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "caption-metrics":
        return caption_metrics_main(argv[1:])
    from blip2_ray.eval.config import EvalConfig
    from blip2_ray.eval.job import check_inputs, run_evaluation

    p = job_parser(__doc__.split("\n")[0], config_help="YAML of overrides of the EvalConfig defaults",
                   json_help="print the metrics as one JSON line last")
    args = p.parse_args(argv)
    cfg = load_job_config(EvalConfig, args)
    check_inputs(cfg)  # before Ray starts
    init_ray(args.address, progress=args.progress)
    report = run_evaluation(cfg)
    print(format_table(report["metrics"], f"{cfg.task} evaluation of {cfg.model}"), flush=True)
    if args.json:
        print(json.dumps(report["metrics"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
