"""Test sets of the evaluation jobs: images, their texts or questions, and the ground truth.

`load_test_set(cfg)` reads LAVIS Karpathy lists, Karpathy's dataset_*.json, image-text shards, or VQA
annotations (VQAv2 / OK-VQA official files, LAVIS-style and GQA lists) into a `TestSet` whose image
rows go to Ray as they are. Ray-free.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field

from blip2_ray.data.annotations import image_id_of as _image_key
from blip2_ray.data.annotations import read_json, vqa_entries
from blip2_ray.errors import UserError
from blip2_ray.eval.config import EvalConfig


@dataclass
class TestSet:
    """Images (rows for Ray: idx, path or bytes), their texts, and the ground truth linking them."""

    images: list[dict] = field(default_factory=list)  # {"idx", "key", "path", "image"}
    texts: list[str] = field(default_factory=list)
    txt2img: list[int] = field(default_factory=list)
    img2txt: list[list[int]] = field(default_factory=list)
    # vqa: {"qidx", "question_id", "idx", "question", "answers", ...}
    questions: list[dict] = field(default_factory=list)


def load_test_set(cfg: EvalConfig) -> TestSet:
    """The configured test set. UserError (one sentence) for a missing file or an unknown format, and
    (retrieval, caption) for a set without images or captions or with a missing image file."""
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
        data = read_json(t.annotations, "test_set.annotations")
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
    data = read_json(t.annotations, "test_set.annotations")
    entries = vqa_entries(data, t.questions, f"test_set.annotations {t.annotations!r}", t.image_pattern)
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
