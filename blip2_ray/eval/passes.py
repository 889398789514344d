"""The evaluation passes: a pool of model actors runs the models, the driver keeps the bookkeeping.

Retrieval (stage-1 model), three passes over the test set, all on one pool (runtime.compute.ModelPool: each
actor loads the model once for the three):
  1. image features (B, Q, E) and text features (T, E); the driver streams the image features through
     `TopKAccumulator` (only the text features and the top k per row are held);
  2. ITM logits for every candidate pair, one pass over the images (each image encoded once, its
     pairs grouped: its own top-k texts and the texts that rank it in their top k);
  3. re-ranked Recall@1/5/10 both ways.
Caption / VQA (stage-2 model): one generation pass, then the metrics of blip2_ray.eval.
A UserError inside an actor (a model export whose weights do not fit, ...) reaches the driver as itself.
"""

from __future__ import annotations

import os

import numpy as np

from blip2_ray.config import to_dict
from blip2_ray.eval.actors import Stage1Actor, Stage2Actor
from blip2_ray.eval.config import EvalConfig
from blip2_ray.eval.test_sets import TestSet, ground_truth, read_json
from blip2_ray.runtime.compute import ModelPool
from blip2_ray.runtime.files import write_json_atomic
from blip2_ray.runtime.user_errors import reraise_user_errors


def _image_rows(ts: TestSet) -> list[dict]:
    return [{"idx": im["idx"], "path": im["path"], "image": im["image"]} for im in ts.images]


def generate(rows: list[dict], cfg: EvalConfig, model_dir: str) -> dict[int, str]:
    """{row idx: generated text} of a stage-2 model over rows {idx, path, image, prompt} (bad images left out),
    on a pool of cfg.compute's actors."""
    out: dict[int, str] = {}
    with reraise_user_errors(), ModelPool(Stage2Actor, cfg.compute, len(rows), model_dir=model_dir,
                                          dtype=cfg.compute.dtype, data_cfg=to_dict(cfg.data),
                                          gen=to_dict(cfg.generation)) as pool:
        for b in pool.map(rows, cfg.compute.batch_size):
            out.update(zip(b["idx"].tolist(), [str(t) for t in b["text"]]))
    return out


def evaluate_retrieval(cfg: EvalConfig, ts: TestSet) -> tuple[dict, dict]:
    """(Recall@1/5/10 both ways after ITM re-ranking, plus ITC-only R@1; counts) of a stage-1 model."""
    import torch

    from blip2_ray.eval.retrieval import TopKAccumulator, itm_pairs, recall_at_k, rerank

    bs = cfg.compute.batch_size
    with reraise_user_errors(), ModelPool(Stage1Actor, cfg.compute, max(len(ts.images), len(ts.texts)),
                                          model_dir=cfg.model, mode="image", dtype=cfg.compute.dtype,
                                          data_cfg=to_dict(cfg.data), texts=ts.texts,
                                          itm_batch_size=cfg.retrieval.itm_batch_size) as pool:
        # 1. text features (small: T x E), then image features streamed into the running top-k
        text_feats = np.zeros((len(ts.texts), 0), np.float32)
        for b in pool.map([{"tidx": i, "text": t} for i, t in enumerate(ts.texts)], bs, mode="text"):
            if text_feats.shape[1] == 0:
                text_feats = np.zeros((len(ts.texts), b["text_feat"].shape[1]), np.float32)
            text_feats[b["tidx"]] = b["text_feat"]
        k = cfg.retrieval.k_test  # each direction is clipped to its number of candidates
        acc = TopKAccumulator(torch.from_numpy(text_feats), k)
        seen = set()
        for b in pool.map(_image_rows(ts), bs, mode="image"):
            acc.add(b["idx"], torch.from_numpy(np.array(b["image_feats"])))  # a writable copy of the shared buffer
            seen.update(b["idx"].tolist())
        skipped_images = len(ts.images) - len(seen)
        i2t = acc.i2t()
        t2i_vals, t2i_idx = acc.t2i()

        # 2. ITM logits of every candidate pair, grouped by image (the images that decoded)
        pairs = itm_pairs(i2t, t2i_idx)
        rows = [{**r, "cands": pairs[r["idx"]]} for r in _image_rows(ts) if r["idx"] in pairs]
        itm: dict[tuple[int, int], float] = {}
        for b in pool.map(rows, bs, mode="itm"):
            itm.update(zip(zip(b["idx"].tolist(), b["tidx"].tolist()), b["itm"].tolist()))

    # 3. rankings and recall (texts of undecodable images have no right answer left: dropped)
    ranked_i2t, ranked_t2i = rerank(i2t, t2i_vals, t2i_idx, itm)
    valid_t = [t for t in range(len(ts.texts)) if ts.txt2img[t] in seen]
    img2txt, txt2img = ground_truth(ts, cfg.retrieval.match_identical_texts)
    gt_t2i = [txt2img[t] for t in valid_t]
    metrics = recall_at_k(ranked_i2t, img2txt, [ranked_t2i[t] for t in valid_t], gt_t2i)
    itc_i2t = {i: idx for i, (_, idx) in i2t.items()}  # ITC order, before re-ranking
    itc_only = recall_at_k(itc_i2t, img2txt, [t2i_idx[t] for t in valid_t], gt_t2i)
    metrics.update({f"itc_{k}": v for k, v in itc_only.items() if k in ("txt_r1", "img_r1")})
    extra = {"images": len(seen), "texts": len(valid_t), "skipped_images": skipped_images, "k_test": k,
             "itm_pairs": len(itm)}
    return metrics, extra


def evaluate_generation(cfg: EvalConfig, ts: TestSet) -> tuple[dict, dict]:
    """(caption metrics or VQA accuracy; counts) of a stage-2 model; the predictions go beside cfg.output (and, for
    captions scored against the test set's own, those references: `blip2-ray evaluate caption-metrics` re-scores)."""
    from blip2_ray.data.processor import vqa_template
    from blip2_ray.eval.caption_metrics import caption_scores, load_references
    from blip2_ray.eval.vqa_metrics import vqa_scores

    g = cfg.generation
    if cfg.task == "caption":
        rows = [{"idx": im["idx"], "path": im["path"], "image": im["image"], "prompt": g.prompt} for im in ts.images]
    else:
        template = g.prompt if "{}" in g.prompt else vqa_template(_llm_kind(cfg.model))
        rows = [{"idx": q["qidx"], "path": ts.images[q["idx"]]["path"], "image": ts.images[q["idx"]]["image"],
                 "prompt": template.format(q["question"])} for q in ts.questions]
    out = generate(rows, cfg, cfg.model)
    predictions = os.path.splitext(cfg.output)[0] + "_predictions.json"
    if cfg.task == "caption":
        preds = {ts.images[i]["key"]: t for i, t in out.items()}
        refs = (load_references(cfg.test_set.references) if cfg.test_set.references else
                {im["key"]: [ts.texts[t] for t in ts.img2txt[im["idx"]]] for im in ts.images})
        write_json_atomic(predictions, [{"image_id": k, "caption": v} for k, v in preds.items()])
        extra = {"predictions": predictions}
        if not cfg.test_set.references:
            extra["references"] = os.path.splitext(cfg.output)[0] + "_references.json"
            write_json_atomic(extra["references"], {"annotations": [{"image_id": k, "caption": c}
                                                                    for k, caps in refs.items() for c in caps]})
        metrics = caption_scores(refs, preds, meteor=cfg.meteor)
        return metrics, {"images": len(preds), "skipped_images": len(ts.images) - len(preds), **extra}
    preds = {ts.questions[i]["question_id"]: t for i, t in out.items()}
    qs = {q["question_id"]: q for q in ts.questions}
    write_json_atomic(predictions, [{"question_id": k, "answer": v} for k, v in preds.items()])
    metrics = vqa_scores(preds, qs, "exact" if cfg.vqa_format == "gqa" else "vqav2", rules=cfg.vqa_rules)
    return metrics, {"questions": len(preds), "skipped_questions": len(ts.questions) - len(preds),
                     "predictions": predictions}


def _llm_kind(model_dir: str) -> str:
    cfg = read_json(os.path.join(model_dir, "config.json"), "model config")
    return "decoder" if cfg.get("use_decoder_only_language_model", True) else "t5"
