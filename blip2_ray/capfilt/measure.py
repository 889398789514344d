"""Does CapFilt prefer the right caption? Measured on generated shapes data with known content.

`swap_web_captions` rewrites sample shards (made by `make_sample_shards`, whose json member names the
colour and shape) so every web caption is wrong: another colour and another shape. After CapFilt runs
on them, `kept_correct_rate` reads its output: the share of images whose best kept caption names the
right colour and shape (and whose wrong web caption is not the best). `wrong_caption_rejection`
checks the filter alone, without a captioner: the correct caption and the wrong one are both
candidates. Both need trained models to mean anything (random ones give ~50%/chance).
"""

from __future__ import annotations

import json
import os

import numpy as np

from blip2_ray.capfilt import shards as S
from blip2_ray.data.readers import list_shards
from blip2_ray.model.tokenizers import COLOURS, SHAPES


def _wrong(colour: str, shape: str, rng: np.random.Generator, num_colours: int = 6, num_shapes: int = 4) -> str:
    cs = [c for c in COLOURS[:num_colours] if c != colour]
    ss = [s for s in SHAPES[:num_shapes] if s != shape]
    return f"a {cs[int(rng.integers(len(cs)))]} {ss[int(rng.integers(len(ss)))]}"


def swap_web_captions(in_dir: str, out_dir: str, seed: int = 0) -> int:
    """Copy WebDataset sample shards with each caption replaced by a wrong one; records written."""
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    n = 0
    for path in list_shards(in_dir):
        recs = []
        for key, members in S.read_tar_members(path, lambda r: None):
            if "json" not in members:
                continue
            meta = json.loads(members["json"])
            if "colour" not in meta:
                continue
            members["txt"] = _wrong(meta["colour"], meta["shape"], rng).encode()
            recs.append((key, members))
        S.write_tar(S.output_path(out_dir, path), recs)
        n += len(recs)
    return n


def _names(text: str, meta: dict) -> bool:
    words = text.lower().split()
    return meta["colour"] in words and meta["shape"] in words


def kept_correct_rate(capfilt_dir: str) -> dict:
    """Over CapFilt output shards: share of images whose top kept caption is right (colour and shape)."""
    n = right = web_top = 0
    for path in list_shards(capfilt_dir):
        for _, members in S.read_tar_members(path, lambda r: None):
            meta, cf = json.loads(members["json"]), json.loads(members["capfilt.json"])
            n += 1
            right += int(_names(cf["captions"][0], meta))
            web_top += int(not cf["synthetic"][0])
    return {"images": n, "top_kept_correct_rate": right / max(1, n), "wrong_web_caption_top_rate": web_top / max(1, n)}


def wrong_caption_rejection(filter_dir: str, data: str, limit: int = 500, seed: int = 0,
                            kind: str = "blip2_itc") -> dict:
    """The filter alone (`kind`: blip2_itc or clip): per image, candidates = the wrong web caption, the correct
    caption and 8 other wrong ones; how often correct > wrong web caption, and how often correct is the top-1."""
    from blip2_ray.capfilt.config import FilterConfig
    from blip2_ray.capfilt.filters import build_filter, check_filter
    from blip2_ray.data.transforms import decode_image

    rng = np.random.default_rng(seed)
    fc = FilterConfig(kind=kind, model=filter_dir)
    check_filter(fc)
    filt = build_filter(fc, text_max_len=32)
    items = []
    for path in list_shards(data):
        for _, m in S.read_tar_members(path, lambda r: None):
            if "json" in m and "jpg" in m and "colour" in json.loads(m["json"]):
                items.append((m["jpg"], json.loads(m["json"])))
            if len(items) >= limit:
                break
        if len(items) >= limit:
            break
    beats = top1 = 0
    k = 10
    for start in range(0, len(items), 32):
        chunk = items[start:start + 32]
        candidates = []
        for _, meta in chunk:
            cands = [_wrong(meta["colour"], meta["shape"], rng), f"a {meta['colour']} {meta['shape']}"]
            candidates.append(cands + [_wrong(meta["colour"], meta["shape"], rng) for _ in range(k - 2)])
        scores, _ = filt.score([decode_image(b, 1, 1 << 30) for b, _ in chunk], candidates)
        for sim in scores:
            beats += int(sim[1] > sim[0])
            top1 += int(int(sim.argmax()) == 1)
    n = max(1, len(items))
    return {"images": len(items), "candidates": k, "correct_kept_rate": beats / n, "top1_correct_rate": top1 / n,
            "filter": filt.provenance}
