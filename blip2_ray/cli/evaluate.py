"""Zero-shot evaluation of BLIP-2 models as Ray Data batch jobs, and scoring of ready-made predictions.

    blip2-ray evaluate --config jobs/configs/eval_retrieval_tiny.yaml [--set key=value ...] [--address A]
    blip2-ray evaluate caption-metrics --predictions P.json --references R.json [--json]

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

from blip2_ray.runtime.cli import cli_main, run_config_job


def format_table(metrics: dict[str, float], title: str = "") -> str:
    """Metrics as a two-column text table (values x100 for scores in [0, 1] named BLEU/CIDEr/METEOR/SPICE)."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    w = max([len(k) for k, _ in rows] + [6])
    lines = [title] if title else []
    lines += [f"{k:<{w}}  {v:>10}" for k, v in rows]
    return "\n".join(lines)


def print_metrics(metrics: dict, title: str, as_json: bool) -> int:
    """The metrics as a table; with `as_json` also as one JSON line last. The command's exit status (0)."""
    print(format_table(metrics, title), flush=True)
    if as_json:
        print(json.dumps(metrics), flush=True)
    return 0


def caption_metrics_main(argv: list[str]) -> int:
    from blip2_ray.eval.caption_metrics import caption_scores, load_predictions, load_references

    p = argparse.ArgumentParser(prog="blip2-ray evaluate caption-metrics",
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
    return print_metrics(scores, f"caption metrics: {len(preds)} images", args.json)


@cli_main(subcommands={"caption-metrics": caption_metrics_main})
def main(argv: list[str]) -> int:
    from blip2_ray.eval.config import EvalConfig
    from blip2_ray.eval.job import check_inputs, run_evaluation

    cfg, args, report = run_config_job(argv, EvalConfig, prog="blip2-ray evaluate", description=__doc__.split("\n")[0],
                                       check=check_inputs, run=run_evaluation,
                                       json_help="print the metrics as one JSON line last")
    return print_metrics(report["metrics"], f"{cfg.task} evaluation of {cfg.model}", args.json)

