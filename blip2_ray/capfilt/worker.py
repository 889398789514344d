"""The CapFilt work on one shard, Ray-free: decode, caption (nucleus sampling), rank by ITC, write.

`CapFiltWorker` loads both models once; `process_shard(path)` turns an input shard into an output shard
(written atomically) and returns its counts. Ray's actor pool calls it through `__call__` (one shard
path per batch); the benchmark's single-process loop calls `process_shard` directly.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter

import numpy as np
import torch

from blip2_ray.capfilt import shards as S
from blip2_ray.capfilt.config import CapFiltConfig
from blip2_ray.config import from_dict
from blip2_ray.data.transforms import EMPTY_CAPTION, SkipRecord, caption_choices, clean_caption, decode_image, eval_transform


def pick_device_dtype(dtype: str) -> tuple[str, torch.dtype]:
    cuda = torch.cuda.is_available()
    if dtype == "auto":
        return ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
    return ("cuda" if cuda else "cpu"), getattr(torch, dtype)


def rank_captions(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(Q, E) one image's query features x (N, E) candidate captions -> (N,) ITC similarity (max over Q)."""
    return (text_feats.float() @ image_feats.float().t()).amax(dim=1)


class CapFiltWorker:
    """Both models in one process: the captioner (stage 2) and the filter (stage 1)."""

    def __init__(self, cfg: dict):
        from blip2_ray.model.hf_format import load_stage1, load_stage2
        from blip2_ray.model.tokenizers import load_llm_tokenizer

        self.cfg = from_dict(CapFiltConfig, cfg)
        fc, cc = self.cfg.filter, self.cfg.captioner
        self.device, fdtype = pick_device_dtype(fc.dtype)
        self.filter, self.filter_tok = load_stage1(fc.model, vision_dtype=str(fdtype).replace("torch.", ""))
        self.filter.to(self.device).eval()
        self.filter_size = self.filter.vision_model.config.image_size
        self.captioner = None
        if cc.num_captions > 0:
            _, cdtype = pick_device_dtype(cc.dtype)
            self.captioner = load_stage2(cc.model, vision_dtype=cdtype, llm_dtype=cdtype).to(self.device).eval()
            self.caption_tok = load_llm_tokenizer(cc.model)
            self.caption_size = self.captioner.vision_model.config.image_size

    # ---------------------------------------------------------------------------- one batch of images
    def _pixels(self, images, size: int) -> torch.Tensor:
        return torch.from_numpy(np.stack([eval_transform(im, size) for im in images])).to(self.device)

    def synthetic_captions(self, images) -> list[list[str]]:
        """K sampled captions per image (cleaned; empty ones dropped)."""
        from blip2_ray.model.stage2 import generate_text

        cc = self.cfg.captioner
        if self.captioner is None or not images:
            return [[] for _ in images]
        px = self._pixels(images, self.caption_size).to(self.captioner.query_tokens.dtype)
        texts = generate_text(self.captioner, self.caption_tok, px, [cc.prompt] if cc.prompt else None,
                              num_beams=1, do_sample=True, top_p=cc.top_p, temperature=cc.temperature,
                              max_new_tokens=cc.max_new_tokens, min_new_tokens=cc.min_new_tokens,
                              num_return_sequences=cc.num_captions)
        k = cc.num_captions  # HF returns the K samples of an image next to each other
        out = []
        for i in range(len(images)):
            caps = []
            for t in texts[i * k:(i + 1) * k]:
                if cc.prompt and cc.prepend_prompt:
                    t = f"{cc.prompt} {t}"
                t = clean_caption(t, self.cfg.data.max_caption_words)
                if t:
                    caps.append(t)
            out.append(caps)
        return out

    def score(self, images, candidates: list[list[str]]) -> list[np.ndarray]:
        """ITC similarity of each image with each of its candidate captions."""
        from blip2_ray.data.records import tokenize_qformer

        px = self._pixels(images, self.filter_size)
        image_feats = self.filter.image_feats(self.filter.encode_image(px))  # (B, Q, E)
        flat = [c for cs in candidates for c in cs]
        enc = tokenize_qformer(self.filter_tok, flat, self.cfg.data.qformer_max_len)
        text_feats = self.filter.text_feat(torch.from_numpy(enc["qformer_input_ids"]).to(self.device),
                                           torch.from_numpy(enc["qformer_attention_mask"]).to(self.device))
        out, start = [], 0
        for b, cs in enumerate(candidates):
            out.append(rank_captions(image_feats[b], text_feats[start:start + len(cs)]).cpu().numpy())
            start += len(cs)
        return out

    @torch.no_grad()  # per call: Ray runs the UDF on another thread, and grad mode is per thread
    def caption_and_filter(self, images, web: list[list[str]]) -> list[dict]:
        """Per image {"captions", "scores", "synthetic"} of the kept captions, best first."""
        synth = self.synthetic_captions(images)
        candidates, flags = [], []
        for w, s in zip(web, synth):
            seen, cs, fl = set(), [], []
            for text, is_synth in [(c, False) for c in w] + [(c, True) for c in s]:
                key = clean_caption(text, self.cfg.data.max_caption_words)
                if key and key not in seen:  # a sample equal to the web caption counts once, as web
                    seen.add(key)
                    cs.append(text)
                    fl.append(is_synth)
            candidates.append(cs)
            flags.append(fl)
        scores = self.score(images, [[clean_caption(c, self.cfg.data.max_caption_words) for c in cs] for cs in candidates])
        out = []
        for cs, fl, sc, s in zip(candidates, flags, scores, synth):
            order = np.argsort(-sc, kind="stable")[: self.cfg.filter.keep]
            out.append({"captions": [cs[i] for i in order], "scores": [round(float(sc[i]), 6) for i in order],
                        "synthetic": [bool(fl[i]) for i in order], "generated": len(s)})
        return out

    # ------------------------------------------------------------------------------------ one shard
    def process_shard(self, in_path: str) -> dict:
        """Write the CapFilt version of `in_path` into output_dir (atomically); its counts."""
        cfg, dc = self.cfg, self.cfg.data
        final = S.output_path(cfg.output_dir, in_path)
        skips: Counter = Counter()
        torch.manual_seed(cfg.seed * 1_000_003 + zlib.crc32(os.path.basename(in_path).encode()))
        parquet = S.is_parquet(in_path)
        if parquet:
            rows, schema = S.read_parquet_rows(in_path, lambda r: skips.update([r]))
            names = list(schema.names) if schema is not None else []
            image_col = next((c for c in dc.image_keys if c in names), None)
            caption_col = next((c for c in dc.caption_keys if c in names), dc.caption_keys[0])
            items = [(str(r.get("key", i)), r, _bytes(r.get(image_col)) if image_col else None, r.get(caption_col))
                     for i, r in enumerate(rows)]
        else:
            items = []
            for key, members in S.read_tar_members(in_path, lambda r: skips.update([r])):
                image = next((members[k] for k in dc.image_keys if k in members), None)
                caption = next((members[k] for k in dc.caption_keys if k in members), None)
                items.append((key, members, image, caption))

        good, out_records = [], []
        for key, record, image, caption in items:
            try:
                web = [c for c in caption_choices(_text(caption)) if clean_caption(c, dc.max_caption_words)]
                if not web:
                    raise SkipRecord(EMPTY_CAPTION)
                im = decode_image(image, dc.min_image_side, dc.max_image_pixels)
            except SkipRecord as e:
                skips.update([e.reason])
                continue
            good.append((key, record, im, web))

        stats = Counter()
        for start in range(0, len(good), cfg.compute.batch_size):
            chunk = good[start:start + cfg.compute.batch_size]
            results = self.caption_and_filter([g[2] for g in chunk], [g[3] for g in chunk])
            for (key, record, _, web), res in zip(chunk, results):
                stats["images"] += 1
                stats["generated"] += res.pop("generated")
                stats["kept"] += len(res["captions"])
                stats["kept_web"] += sum(not s for s in res["synthetic"])
                stats["images_with_web_kept"] += int(any(not s for s in res["synthetic"]))
                meta = {**res, "web": web}
                if parquet:
                    row = dict(record)
                    row[caption_col] = res["captions"]
                    row["capfilt"] = json.dumps(meta)
                    out_records.append(row)
                else:
                    members = dict(record)
                    cap_key = next((k for k in dc.caption_keys if k in members), dc.caption_keys[0])
                    members[cap_key] = json.dumps(res["captions"]).encode()
                    members["capfilt.json"] = json.dumps(meta).encode()
                    out_records.append((key, members))

        summary = {"shard": in_path, "output": final, **{k: int(stats[k]) for k in
                   ("images", "generated", "kept", "kept_web", "images_with_web_kept")}, "skipped": dict(skips)}
        # counts first, the shard last: the shard's final name is the commit point of the whole shard
        S.write_json(final + ".capfilt.json", summary)
        if parquet:
            S.write_parquet(final, out_records, schema, caption_col)
        else:
            S.write_tar(final, out_records)
        return summary

    def __call__(self, batch: dict) -> dict:
        """Ray map_batches entry: batch {"path": [shard]} -> one summary row per shard (as JSON)."""
        rows = [self.process_shard(str(p)) for p in batch["path"]]
        return {"summary": np.array([json.dumps(r) for r in rows], dtype=object)}


def _bytes(v):
    if isinstance(v, dict):
        v = v.get("bytes")
    return None if v is None else bytes(v)


def _text(v):
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    return v
