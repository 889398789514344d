"""Evaluation of an instruction-tuned model (or of the stage-2 model it starts from) on every evaluated source of
the instruct config, held-in and held-out, in one generation pass (one actor pool; each row its own prompt: the
source's evaluation template filled with the question / answer), then each source's metric:
  vqa_accuracy  VQAv2's accuracy over the human answers (the evaluation job's rules: eval/vqa_metrics.py)
  exact_match   the first answer only (GQA)
  cider         CIDEr-D against the references (captions; vqg: the question), x100
and the mean score of the held-in and of the held-out sources. A question-aware model's Q-Former reads the prompt
too (eval/actors.Stage2Actor); a stage-2 model reads it in its LLM only. Images that do not exist are counted and
left out.
"""

from __future__ import annotations

import os
from collections import Counter

from blip2_ray.data.instruct import caption_records, fill, question_records, usable_templates
from blip2_ray.eval.test_sets import read_json

DEFAULT_METRIC = {"vqa": "vqa_accuracy", "vqg": "cider", "caption": "cider"}


def eval_rows(source, start: int = 0, limit: int | None = None, max_caption_words: int = 50) -> tuple[list, dict]:
    """(rows {"idx", "path", "image", "prompt"}, truth {idx: references}) of one source's eval file; rows
    numbered from `start`; at most `limit` rows; images not found are counted in truth["__missing__"]."""
    from blip2_ray.data.transforms import clean_caption

    template = source.eval_template or usable_templates(source.kind, source.templates)[0]
    root = source.eval_image_root or source.image_root
    what = f"instruct source {source.name!r} eval {source.eval!r}"
    data = read_json(source.eval, what)
    items: list[tuple[str | None, str, list[str]]] = []  # (image, prompt, references)
    if source.kind == "caption":
        for r in caption_records(data, what, source.eval_split):
            caps = [clean_caption(str(c), max_caption_words) for c in r["captions"]]
            items.append((r["image"], template, [c for c in caps if c]))
    else:
        for r in question_records(data, source.eval_questions, what):
            answers = [a.strip() for a in r["answers"] if a and a.strip()]
            if source.kind == "vqa":
                items.append((r["image"], fill(template, r["question"].strip()), answers))
            elif answers:
                items.append((r["image"], fill(template, Counter(answers).most_common(1)[0][0]), [r["question"]]))
    rows, truth, missing = [], {}, 0
    for image, prompt, refs in items[: limit or None]:
        path = os.path.join(root, str(image)) if image else ""
        if not refs:
            continue
        if not path or not os.path.isfile(path):
            missing += 1
            continue
        idx = start + len(rows)
        rows.append({"idx": idx, "path": path, "image": b"", "prompt": prompt})
        truth[idx] = refs
    truth["__missing__"] = missing
    return rows, truth


def score_source(metric: str, predictions: dict[int, str], truth: dict, rules: str = "lavis") -> dict[str, float]:
    """{"score", and the metric's own numbers} of one source's predictions {idx: text} against truth {idx: refs}."""
    from blip2_ray.eval.caption_metrics import caption_scores
    from blip2_ray.eval.vqa_metrics import vqa_scores

    truth = {k: v for k, v in truth.items() if k != "__missing__"}
    preds = {k: v for k, v in predictions.items() if k in truth}
    if not preds:
        return {"score": 0.0}
    if metric == "cider":
        scores = caption_scores({k: truth[k] for k in preds}, preds, meteor=False, spice=False)
        return {"score": round(100.0 * scores["CIDEr"], 2), "CIDEr": scores["CIDEr"], "BLEU-4": scores["BLEU-4"]}
    questions = {k: {"answers": truth[k]} for k in truth}
    acc = vqa_scores(preds, questions, "exact" if metric == "exact_match" else "vqav2", rules=rules)["accuracy"]
    return {"score": acc, "accuracy": acc}


def evaluate_instruct(evaluated, model_dir: str, output: str, *, generation, compute, data, limit: int | None = None,
                      vqa_rules: str = "lavis", max_caption_words: int = 50) -> dict:
    """{source name: {"held", "kind", "metric", "score", "rows", "missing_images", ...}, "held_in": mean score,
    "held_out": mean score} of `model_dir` over `evaluated` [("held_in" | "held_out", InstructSourceSection)];
    the predictions go beside `output` (<output stem>_predictions.json)."""
    from blip2_ray.config import from_dict, to_dict
    from blip2_ray.eval.config import EvalConfig
    from blip2_ray.eval.passes import generate
    from blip2_ray.runtime.files import write_json_atomic

    rows, per = [], []
    for held, s in evaluated:
        r, truth = eval_rows(s, len(rows), limit, max_caption_words)
        rows += r
        per.append((held, s, truth))
    ecfg = from_dict(EvalConfig, {"task": "vqa", "model": model_dir, "output": output,
                                  "test_set": {"annotations": evaluated[0][1].eval},
                                  "generation": to_dict(generation), "compute": to_dict(compute),
                                  "data": {"image_size": data.image_size, "qformer_max_len": data.qformer_max_len},
                                  "vqa_rules": vqa_rules})
    out = generate(rows, ecfg, model_dir) if rows else {}
    metrics: dict = {}
    predictions = {}
    means: dict[str, list[float]] = {"held_in": [], "held_out": []}
    for held, s, truth in per:
        metric = s.metric or DEFAULT_METRIC[s.kind]
        m = score_source(metric, out, truth, vqa_rules)
        n = len(truth) - 1
        metrics[s.name] = {"held": held, "kind": s.kind, "metric": metric, **m, "rows": n,
                           "predicted": sum(1 for k in truth if k in out), "missing_images": truth["__missing__"]}
        means[held].append(m["score"])
        predictions[s.name] = [{"prompt": rows[k]["prompt"], "prediction": out.get(k), "references": truth[k]}
                               for k in truth if k != "__missing__"]  # a row's idx is its place in `rows`
    for held, scores in means.items():
        if scores:
            metrics[held] = round(sum(scores) / len(scores), 2)
    write_json_atomic(os.path.splitext(output)[0] + "_predictions.json", predictions)
    return metrics
