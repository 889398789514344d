"""The CapFilt work on one shard, Ray-free: decode, caption (nucleus sampling), rank, write.

`CapFiltWorker` holds one captioner and one filter (`captioners.py`, `filters.py`: BLIP-2 or the paper's
BLIP + CLIP, any pair); `process_shard(path)` turns an input shard into an output shard (written
atomically) and returns its counts. Ray's actor pool calls it through `__call__` (one shard path per
batch); the benchmark's single-process loop calls `process_shard` directly.
"""

from __future__ import annotations

import json
import os
import zlib
from collections import Counter

import numpy as np
import torch

from blip2_ray.capfilt import shards as S
from blip2_ray.capfilt.captioners import build_captioner
from blip2_ray.capfilt.config import CapFiltConfig
from blip2_ray.capfilt.filters import build_filter
from blip2_ray.capfilt.model_dirs import model_name
from blip2_ray.config import from_dict
from blip2_ray.data.transforms import EMPTY_CAPTION, SkipRecord, caption_choices, clean_caption, decode_image
from blip2_ray.runtime.files import write_json_atomic

# per-shard counts (the job sums them): captions written, kept, and cut to the filter's text limit
SHARD_COUNTS = ("images", "generated", "kept", "kept_web", "images_with_web_kept", "truncated")


def shard_seed(seed: int, in_path: str) -> int:
    """The torch seed of one shard's caption sampling: the run's seed and the shard's file name."""
    return seed * 1_000_003 + zlib.crc32(os.path.basename(in_path).encode())


def provenance(cfg: CapFiltConfig) -> dict:
    """Which models wrote and ranked the captions: {"captioner": {"kind", "model"} or None, "filter": {...}}."""
    cc, fc = cfg.captioner, cfg.filter
    captioner = {"kind": cc.kind, "model": model_name(cc.model)} if cc.num_captions > 0 else None
    return {"captioner": captioner, "filter": {"kind": fc.kind, "model": model_name(fc.model)}}


class CapFiltWorker:
    """One model pair in one process: the captioner (`captioner.kind`) and the filter (`filter.kind`)."""

    def __init__(self, cfg: dict):
        self.cfg = from_dict(CapFiltConfig, cfg)
        self.filter = build_filter(self.cfg.filter, self.cfg.data.qformer_max_len)
        self.captioner = build_captioner(self.cfg.captioner)
        self.provenance = provenance(self.cfg)

    # ---------------------------------------------------------------------------- one batch of images
    def synthetic_captions(self, images) -> list[list[str]]:
        """K sampled captions per image (cleaned; empty ones dropped)."""
        if self.captioner is None or not images:
            return [[] for _ in images]
        words = self.cfg.data.max_caption_words
        return [[c for c in (clean_caption(t, words) for t in texts) if c] for texts in self.captioner.caption(images)]

    @torch.no_grad()  # per call: Ray runs the UDF on another thread, and grad mode is per thread
    def caption_and_filter(self, images, web: list[list[str]]) -> tuple[list[dict], int]:
        """(per image {"captions", "scores", "synthetic", "generated"} of the kept captions, best first;
        how many candidates the filter truncated to its text limit)."""
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
        scores, truncated = self.filter.score(
            images, [[clean_caption(c, self.cfg.data.max_caption_words) for c in cs] for cs in candidates])
        out = []
        for cs, fl, sc, s in zip(candidates, flags, scores, synth):
            order = np.argsort(-sc, kind="stable")[: self.cfg.filter.keep]
            out.append({"captions": [cs[i] for i in order], "scores": [round(float(sc[i]), 6) for i in order],
                        "synthetic": [bool(fl[i]) for i in order], "generated": len(s)})
        return out, truncated

    # ------------------------------------------------------------------------------------ one shard
    def process_shard(self, in_path: str) -> dict:
        """Write the CapFilt version of `in_path` into output_dir (atomically); its counts."""
        cfg, dc = self.cfg, self.cfg.data
        final = S.output_path(cfg.output_dir, in_path)
        skips: Counter = Counter()
        torch.manual_seed(shard_seed(cfg.seed, in_path))
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
            results, truncated = self.caption_and_filter([g[2] for g in chunk], [g[3] for g in chunk])
            stats["truncated"] += truncated
            for (key, record, _, web), res in zip(chunk, results):
                stats["images"] += 1
                stats["generated"] += res.pop("generated")
                stats["kept"] += len(res["captions"])
                stats["kept_web"] += sum(not s for s in res["synthetic"])
                stats["images_with_web_kept"] += int(any(not s for s in res["synthetic"]))
                meta = {**res, "web": web, **self.provenance}
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

        summary = {"shard": in_path, "output": final, **{k: int(stats[k]) for k in SHARD_COUNTS},
                   "skipped": dict(skips), "models": self.provenance}
        # counts first, the shard last: the shard's final name is the commit point of the whole shard
        write_json_atomic(final + ".capfilt.json", summary)
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
