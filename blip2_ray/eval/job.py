"""Evaluation jobs on Ray Data: model passes run in actor pools, the bookkeeping on the driver.

Retrieval (stage-1 model), three passes over the test set:
  1. image features (B, Q, E) and text features (T, E) from actor pools; the driver streams the image
     features through `TopKAccumulator` (only the text features and the top k per row are held);
  2. ITM logits for every candidate pair, one pass over the images (each image encoded once, its
     pairs grouped: its own top-k texts and the texts that rank it in their top k);
  3. re-ranked Recall@1/5/10 both ways.
Caption / VQA (stage-2 model): one generation pass, then the metrics of blip2_ray.eval.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from blip2_ray.config import to_dict
from blip2_ray.errors import UserError
from blip2_ray.eval.config import EvalConfig


# ------------------------------------------------------------------------------------------ test sets
@dataclass
class TestSet:
    """Images (rows for Ray: idx, path or bytes), their texts, and the ground truth linking them."""

    images: list[dict] = field(default_factory=list)  # {"idx", "key", "path", "image"}
    texts: list[str] = field(default_factory=list)
    txt2img: list[int] = field(default_factory=list)
    img2txt: list[list[int]] = field(default_factory=list)
    questions: list[dict] = field(default_factory=list)  # vqa: {"qidx", "question_id", "idx", "question", "answers", ...}


def _read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist")
    with open(path) as f:
        try:
            return json.load(f)
        except ValueError as e:
            raise UserError(f"{what} {path!r} is not valid JSON ({e})") from None


def _image_key(path: str) -> int | str:
    """COCO-style ids from file names (COCO_val2014_000000391895.jpg -> 391895), else the path."""
    m = re.search(r"(\d+)\.\w+$", path)
    return int(m.group(1)) if m else path


def load_test_set(cfg: EvalConfig) -> TestSet:
    ts, t = TestSet(), cfg.test_set
    if cfg.task == "vqa":
        return _load_vqa(cfg)
    from blip2_ray.data.transforms import clean_caption

    def add(key, path, image, captions):
        idx = len(ts.images)
        ts.images.append({"idx": idx, "key": key, "path": path or "", "image": image or b""})
        ts.img2txt.append([])
        for c in captions:
            c = clean_caption(c, cfg.data.max_caption_words)
            if c:
                ts.img2txt[idx].append(len(ts.texts))
                ts.texts.append(c)
                ts.txt2img.append(idx)

    if t.annotations:
        data = _read_json(t.annotations, "test_set.annotations")
        if isinstance(data, dict) and "images" in data:  # Karpathy's dataset_coco.json / dataset_flickr30k.json
            for im in data["images"]:
                if im.get("split") != t.split:
                    continue
                rel = os.path.join(im.get("filepath", ""), im["filename"])
                add(im.get("cocoid", im.get("imgid", rel)), os.path.join(t.image_root, rel), None,
                    [s.get("raw") or " ".join(s.get("tokens", [])) for s in im["sentences"]])
                if t.limit and len(ts.images) >= t.limit:
                    break
        elif isinstance(data, list):  # LAVIS' coco_karpathy_test.json / flickr30k_test.json
            for e in data[: t.limit or None]:
                caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
                add(e.get("image_id", _image_key(e["image"])), os.path.join(t.image_root, e["image"]), None, caps)
        else:
            raise UserError(f"test_set.annotations {t.annotations!r} is in no known format (a LAVIS list or "
                            f"Karpathy's dataset_*.json)")
    else:
        from blip2_ray.data.pipeline import resolve_sources
        from blip2_ray.data.readers import read_shard_records
        from blip2_ray.data.transforms import SkipRecord, caption_choices

        for f in resolve_sources(t.shards, cfg.data):
            for r in read_shard_records(f, cfg.data.image_keys, cfg.data.caption_keys, lambda reason: None):
                try:
                    caps = caption_choices(r["caption"])
                except SkipRecord:
                    continue
                if r["image"] is None:
                    continue
                add(r["key"], None, r["image"], caps)
                if t.limit and len(ts.images) >= t.limit:
                    break
            if t.limit and len(ts.images) >= t.limit:
                break
    if not ts.images:
        raise UserError("the test set holds no image; check test_set.annotations / split / shards")
    if not ts.texts:
        raise UserError("the test set holds no caption; check test_set.annotations / data.caption_keys")
    for im in ts.images:
        if im["path"] and not os.path.isfile(im["path"]):
            raise UserError(f"image {im['path']!r} of the test set does not exist; check test_set.image_root")
    return ts


def _load_vqa(cfg: EvalConfig) -> TestSet:
    t, ts = cfg.test_set, TestSet()
    data = _read_json(t.annotations, "test_set.annotations")
    entries = []
    if isinstance(data, dict) and "annotations" in data:  # VQAv2 / OK-VQA official files
        if not t.questions:
            raise UserError("VQAv2 annotations need test_set.questions (the questions JSON)")
        qs = {q["question_id"]: q for q in _read_json(t.questions, "test_set.questions")["questions"]}
        for a in data["annotations"]:
            q = qs[a["question_id"]]
            entries.append({"question_id": a["question_id"], "question": q["question"],
                            "image": t.image_pattern.format(image_id=a["image_id"]),
                            "answers": [x["answer"] for x in a["answers"]], "answer_type": a.get("answer_type")})
    elif isinstance(data, list):  # LAVIS-style lists; GQA: "answer" is one string
        for e in data:
            ans = e.get("answer", e.get("answers", []))
            entries.append({"question_id": e["question_id"], "question": e["question"], "image": e["image"],
                            "answers": [ans] if isinstance(ans, str) else list(ans), "answer_type": e.get("answer_type")})
    else:
        raise UserError(f"test_set.annotations {t.annotations!r} is in no known VQA format")
    entries = entries[: t.limit or None]
    by_image: dict[str, int] = {}
    for e in entries:
        path = os.path.join(t.image_root, e["image"])
        if path not in by_image:
            if not os.path.isfile(path):
                raise UserError(f"image {path!r} of the test set does not exist; check test_set.image_root")
            by_image[path] = len(ts.images)
            ts.images.append({"idx": len(ts.images), "key": e["image"], "path": path, "image": b""})
        ts.questions.append({**e, "qidx": len(ts.questions), "idx": by_image[path]})
    return ts


# ------------------------------------------------------------------------------------------ actors
def _device_dtype(dtype: str):
    import torch

    cuda = torch.cuda.is_available()
    if dtype == "auto":
        return ("cuda", "float16") if cuda else ("cpu", "float32")
    return ("cuda" if cuda else "cpu"), dtype


def _decode_rows(batch: dict, size: int, data_cfg: dict):
    """Row images (bytes or a path) -> (kept row positions, float32 (B, 3, S, S)); bad images dropped."""
    from blip2_ray.data.config import DataConfig
    from blip2_ray.data.transforms import SkipRecord, decode_image, eval_transform

    dc = DataConfig(**data_cfg)
    keep, px = [], []
    for i in range(len(batch["idx"])):
        try:
            raw = bytes(batch["image"][i]) if len(batch["image"][i]) else open(str(batch["path"][i]), "rb").read()
            px.append(eval_transform(decode_image(raw, dc.min_image_side, dc.max_image_pixels), size))
            keep.append(i)
        except (SkipRecord, OSError):
            continue
    return keep, (np.stack(px) if px else np.zeros((0, 3, size, size), np.float32))


class Stage1Actor:
    """Ray actor for retrieval. mode "image": rows {idx, path, image} -> {idx, image_feats (Q, E)};
    "text": rows {tidx, text} -> {tidx, text_feat (E,)}; "itm": image rows -> one row per candidate pair
    {idx, tidx, itm} with the positive ITM logit (pairs and tokenised texts given to the constructor)."""

    def __init__(self, model_dir: str, mode: str, dtype: str, data_cfg: dict, pairs: dict | None = None,
                 text_ids: np.ndarray | None = None, text_mask: np.ndarray | None = None, itm_batch_size: int = 128):
        import torch

        from blip2_ray.model.hf_format import load_stage1

        self.device, vdtype = _device_dtype(dtype)
        self.model, self.tok = load_stage1(model_dir, vision_dtype=vdtype)
        self.model.to(self.device).eval()
        self.size = self.model.vision_model.config.image_size
        self.mode, self.data_cfg = mode, data_cfg
        self.pairs, self.itm_batch_size = pairs or {}, itm_batch_size
        self.text_ids = None if text_ids is None else torch.from_numpy(text_ids)
        self.text_mask = None if text_mask is None else torch.from_numpy(text_mask)

    def __call__(self, batch: dict) -> dict:
        import torch

        with torch.no_grad():
            if self.mode == "text":
                from blip2_ray.data.records import tokenize_qformer

                enc = tokenize_qformer(self.tok, [str(t) for t in batch["text"]], self.data_cfg["qformer_max_len"])
                feat = self.model.text_feat(torch.from_numpy(enc["qformer_input_ids"]).to(self.device),
                                            torch.from_numpy(enc["qformer_attention_mask"]).to(self.device))
                return {"tidx": np.asarray(batch["tidx"]), "text_feat": feat.float().cpu().numpy()}
            keep, px = _decode_rows(batch, self.size, self.data_cfg)
            idx = np.asarray(batch["idx"])[keep]
            embeds = self.model.encode_image(torch.from_numpy(px).to(self.device))  # (B, N, D)
            if self.mode == "image":
                return {"idx": idx, "image_feats": self.model.image_feats(embeds).float().cpu().numpy()}
            return self._itm(idx, embeds)

    def _itm(self, idx: np.ndarray, embeds) -> dict:
        import torch

        img_pos, txt = [], []
        for b, i in enumerate(idx.tolist()):
            ts = self.pairs.get(i, np.zeros(0, np.int64))
            img_pos.extend([b] * len(ts))
            txt.extend(ts.tolist())
        out = []
        for s in range(0, len(txt), self.itm_batch_size):
            ip = torch.tensor(img_pos[s:s + self.itm_batch_size], device=self.device)
            tp = torch.tensor(txt[s:s + self.itm_batch_size])
            logits = self.model.itm_logits(embeds[ip], self.text_ids[tp].to(self.device), self.text_mask[tp].to(self.device))
            out.append(logits[:, 1].float().cpu().numpy())
        return {"idx": idx[img_pos] if img_pos else np.zeros(0, np.int64), "tidx": np.asarray(txt, np.int64),
                "itm": np.concatenate(out) if out else np.zeros(0, np.float32)}


class Stage2Actor:
    """Ray actor for caption / VQA: rows {idx, path, image, prompt} -> {idx, text} (bad images dropped)."""

    def __init__(self, model_dir: str, dtype: str, data_cfg: dict, gen: dict):
        import torch

        from blip2_ray.model.hf_format import load_stage2
        from blip2_ray.model.tokenizers import load_llm_tokenizer

        self.device, d = _device_dtype(dtype)
        self.model = load_stage2(model_dir, vision_dtype=getattr(torch, d), llm_dtype=getattr(torch, d)).to(self.device).eval()
        self.tok = load_llm_tokenizer(model_dir)
        self.size = self.model.vision_model.config.image_size
        self.data_cfg, self.gen = data_cfg, gen

    def __call__(self, batch: dict) -> dict:
        import torch

        from blip2_ray.model.stage2 import generate_text

        keep, px = _decode_rows(batch, self.size, self.data_cfg)
        prompts = [str(batch["prompt"][i]) for i in keep]
        if not keep:
            return {"idx": np.zeros(0, np.int64), "text": np.array([], dtype=object)}
        with torch.no_grad():
            texts = generate_text(self.model, self.tok, torch.from_numpy(px).to(self.device).to(self.model.query_tokens.dtype),
                                  prompts if any(prompts) else None, num_beams=self.gen["num_beams"],
                                  max_new_tokens=self.gen["max_new_tokens"], min_new_tokens=self.gen["min_new_tokens"],
                                  length_penalty=self.gen["length_penalty"])
        return {"idx": np.asarray(batch["idx"])[keep], "text": np.array(texts, dtype=object)}


# ------------------------------------------------------------------------------------------ passes
def _pool(cfg: EvalConfig, n_rows: int) -> dict:
    import ray

    gpus = cfg.compute.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return dict(compute=ray.data.ActorPoolStrategy(size=max(1, min(cfg.compute.num_actors, n_rows))),
                num_gpus=gpus, num_cpus=cfg.compute.num_cpus_per_actor, batch_format="numpy")


def _image_rows(ts: TestSet, batch_size: int):
    import ray

    rows = [{"idx": im["idx"], "path": im["path"], "image": im["image"]} for im in ts.images]
    return ray.data.from_items(rows, override_num_blocks=max(1, min(64, len(rows) // max(1, batch_size))))


def _run(ds):
    from blip2_ray.capfilt.job import user_error_in

    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as e:
        cause = user_error_in(e)
        if cause is not None:
            raise cause from None
        raise


def ground_truth(ts: TestSet, match_identical_texts: bool) -> tuple[list[list[int]], list]:
    """(img2txt, txt2img); with `match_identical_texts` every text equal to one of an image's captions
    is right for it (and every image with that caption is right for the text)."""
    if not match_identical_texts:
        return ts.img2txt, ts.txt2img
    by_text: dict[str, list[int]] = defaultdict(list)
    for t, text in enumerate(ts.texts):
        by_text[text].append(t)
    img2txt = [sorted({u for t in own for u in by_text[ts.texts[t]]}) for own in ts.img2txt]
    images_of: dict[str, set[int]] = defaultdict(set)
    for t, text in enumerate(ts.texts):
        images_of[text].add(ts.txt2img[t])
    return img2txt, [sorted(images_of[text]) for text in ts.texts]


def evaluate_retrieval(cfg: EvalConfig, ts: TestSet) -> tuple[dict, dict]:
    import ray
    import torch

    from blip2_ray.data.records import cached_qformer_tokenizer, tokenize_qformer
    from blip2_ray.eval.retrieval import TopKAccumulator, itm_pairs, recall_at_k, rerank

    dc, bs = to_dict(cfg.data), cfg.compute.batch_size
    common = dict(model_dir=cfg.model, dtype=cfg.compute.dtype, data_cfg=dc)
    # 1. text features (small: T x E), then image features streamed into the running top-k
    tds = ray.data.from_items([{"tidx": i, "text": t} for i, t in enumerate(ts.texts)],
                              override_num_blocks=max(1, min(64, len(ts.texts) // bs)))
    tds = tds.map_batches(Stage1Actor, fn_constructor_kwargs={**common, "mode": "text"}, batch_size=bs,
                          **_pool(cfg, len(ts.texts)))
    text_feats = np.zeros((len(ts.texts), 0), np.float32)
    for b in _run(tds):
        if text_feats.shape[1] == 0:
            text_feats = np.zeros((len(ts.texts), b["text_feat"].shape[1]), np.float32)
        text_feats[b["tidx"]] = b["text_feat"]
    k = cfg.retrieval.k_test  # each direction is clipped to its number of candidates
    acc = TopKAccumulator(torch.from_numpy(text_feats), k)
    ids = _image_rows(ts, bs).map_batches(Stage1Actor, fn_constructor_kwargs={**common, "mode": "image"},
                                          batch_size=bs, **_pool(cfg, len(ts.images)))
    seen = set()
    for b in _run(ids):
        acc.add(b["idx"], torch.from_numpy(b["image_feats"]))
        seen.update(b["idx"].tolist())
    skipped_images = len(ts.images) - len(seen)
    i2t = acc.i2t()
    t2i_vals, t2i_idx = acc.t2i()

    # 2. ITM logits of every candidate pair, grouped by image
    pairs = itm_pairs(i2t, t2i_idx)
    tok = cached_qformer_tokenizer(os.path.abspath(cfg.model))
    enc = tokenize_qformer(tok, ts.texts, cfg.data.qformer_max_len)
    itm_ds = _image_rows(ts, bs).map_batches(
        Stage1Actor, batch_size=bs, **_pool(cfg, len(ts.images)),
        fn_constructor_kwargs={**common, "mode": "itm", "pairs": pairs, "text_ids": enc["qformer_input_ids"],
                               "text_mask": enc["qformer_attention_mask"], "itm_batch_size": cfg.retrieval.itm_batch_size})
    itm: dict[tuple[int, int], float] = {}
    for b in _run(itm_ds):
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
    from blip2_ray.eval.caption_metrics import caption_scores, load_references
    from blip2_ray.eval.vqa_metrics import vqa_scores
    from blip2_ray.model.stage2 import VQA_PROMPTS

    g = cfg.generation
    gen = to_dict(g)
    if cfg.task == "caption":
        rows = [{"idx": im["idx"], "path": im["path"], "image": im["image"], "prompt": g.prompt} for im in ts.images]
    else:
        kind = _llm_kind(cfg.model)
        template = g.prompt if "{}" in g.prompt else VQA_PROMPTS[kind]
        rows = [{"idx": q["qidx"], "path": ts.images[q["idx"]]["path"], "image": ts.images[q["idx"]]["image"],
                 "prompt": template.format(q["question"])} for q in ts.questions]
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(64, len(rows) // cfg.compute.batch_size)))
    ds = ds.map_batches(Stage2Actor, batch_size=cfg.compute.batch_size, **_pool(cfg, len(rows)),
                        fn_constructor_kwargs=dict(model_dir=cfg.model, dtype=cfg.compute.dtype,
                                                   data_cfg=to_dict(cfg.data), gen=gen))
    out: dict[int, str] = {}
    for b in _run(ds):
        out.update(zip(b["idx"].tolist(), [str(t) for t in b["text"]]))
    base = os.path.splitext(cfg.output)[0]
    if cfg.task == "caption":
        preds = {ts.images[i]["key"]: t for i, t in out.items()}
        refs = (load_references(cfg.test_set.references) if cfg.test_set.references else
                {im["key"]: [ts.texts[t] for t in ts.img2txt[im["idx"]]] for im in ts.images})
        _write(base + "_predictions.json", [{"image_id": k, "caption": v} for k, v in preds.items()])
        metrics = caption_scores(refs, preds)
        return metrics, {"images": len(preds), "skipped_images": len(ts.images) - len(preds),
                         "predictions": base + "_predictions.json"}
    preds = {ts.questions[i]["question_id"]: t for i, t in out.items()}
    qs = {q["question_id"]: q for q in ts.questions}
    _write(base + "_predictions.json", [{"question_id": k, "answer": v} for k, v in preds.items()])
    metrics = vqa_scores(preds, qs, "exact" if cfg.vqa_format == "gqa" else "vqav2")
    return metrics, {"questions": len(preds), "skipped_questions": len(ts.questions) - len(preds),
                     "predictions": base + "_predictions.json"}


def _llm_kind(model_dir: str) -> str:
    cfg = _read_json(os.path.join(model_dir, "config.json"), "model config")
    return "decoder" if cfg.get("use_decoder_only_language_model", True) else "t5"


def _write(path: str, data) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def check_inputs(cfg: EvalConfig) -> None:
    """One clear sentence, before Ray starts, for a missing model or annotation file."""
    if not os.path.isfile(os.path.join(cfg.model, "config.json")):
        raise UserError(f"model {cfg.model!r} is not a model export directory (no config.json)")
    for what, path in (("test_set.annotations", cfg.test_set.annotations), ("test_set.questions", cfg.test_set.questions),
                       ("test_set.references", cfg.test_set.references)):
        if path and not os.path.isfile(path):
            raise UserError(f"{what} {path!r} does not exist")


def run_evaluation(cfg: EvalConfig) -> dict:
    """Run the configured evaluation; write and return the report {"task", "model", "metrics", ...}."""
    check_inputs(cfg)
    t0 = time.time()
    ts = load_test_set(cfg)
    if cfg.task == "retrieval":
        metrics, extra = evaluate_retrieval(cfg, ts)
    else:
        metrics, extra = evaluate_generation(cfg, ts)
    report = {"task": cfg.task, "model": os.path.abspath(cfg.model), "metrics": metrics, **extra,
              "seconds": round(time.time() - t0, 1), "config": to_dict(cfg)}
    _write(cfg.output, report)
    return report
