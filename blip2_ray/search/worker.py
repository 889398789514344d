"""One shard's images -> their Q-Former ITC features, stored in the index directory; Ray-free.

`ShardIndexer` holds one stage-1 model; `index_shard(path)` reads the shard with the data pipeline's
reader (tar or parquet, local or s3://), decodes and resizes each image as the evaluation job does
(`decode_image`, `eval_resize` to the model's input size, CLIP mean/std), computes the (Q, E) features in
batches of compute.batch_size (decoding the next batches on a second thread meanwhile), and stores them
with each image's key, caption and location (`store.write_shard`). Bad records are skipped and counted by
reason, as the data pipeline counts them; an unreadable shard counts `truncated_shard` / `empty_shard`.
Ray's actor pool calls it through `__call__` (one shard path per batch); the benchmark's single-process
loop calls `index_shard` directly.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter
from typing import Iterator

import numpy as np
import torch

from blip2_ray.config import from_dict
from blip2_ray.data.readers import read_shard_records
from blip2_ray.data.sources import storage_options
from blip2_ray.data.transforms import SkipRecord, caption_choices, decode_image, eval_resize, normalize_pixels_tensor
from blip2_ray.runtime.compute import device_and_dtype
from blip2_ray.search import store
from blip2_ray.search.config import IndexJobConfig

UNCAPTIONED = "uncaptioned"  # indexed with an empty caption (not a skip)


def caption_text(raw) -> str:
    """The record's caption as stored beside its image: the first of its captions, stripped ("" if none)."""
    try:
        return caption_choices(raw)[0].strip()
    except SkipRecord:
        return ""


def decode_ahead(chunks: Iterator, depth: int) -> Iterator:
    """`chunks`, produced on a second thread up to `depth` ahead (0: in this thread)."""
    if depth <= 0:
        yield from chunks
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def produce():
        try:
            for c in chunks:
                q.put(c)
        except BaseException as e:  # handed to the consumer, raised there
            q.put(e)
        q.put(end)

    threading.Thread(target=produce, daemon=True, name="decode-ahead").start()
    while (item := q.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


class ShardIndexer:
    """A stage-1 model in this process, computing and storing the features of whole shards."""

    def __init__(self, cfg: dict, s3_opts: dict | None = None):
        """`s3_opts`: the driver's S3 settings and credentials (data.sources.storage_options), as the data
        pipeline hands them to its tasks; None resolves them in this process."""
        from blip2_ray.weights.hf_format import load_stage1

        self.cfg = from_dict(IndexJobConfig, cfg)
        self.device, vdtype = device_and_dtype(self.cfg.compute.dtype)
        self.model, _ = load_stage1(self.cfg.model, vision_dtype=vdtype)
        self.model.to(self.device).eval()
        self.size = self.model.vision_model.config.image_size
        d = self.cfg.data
        self.s3_opts = s3_opts if s3_opts is not None else storage_options(d.s3_endpoint_url, d.s3_anonymous,
                                                                            d.s3_region)

    @torch.no_grad()  # per call: Ray runs the UDF on another thread, and grad mode is per thread
    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (B, 3, S, S) at the model's size -> float32 (B, Q, E) L2-normalised ITC features."""
        x = normalize_pixels_tensor(torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device))
        return self.model.image_feats(self.model.encode_image(x)).float().cpu().numpy()

    def _decoded(self, path: str, skips: Counter) -> Iterator[tuple[list, np.ndarray]]:
        """([(key, caption, image_at)], uint8 pixels (B, 3, S, S)) per compute.batch_size good records."""
        d, bs = self.cfg.data, self.cfg.compute.batch_size
        meta, px = [], []
        for r in read_shard_records(path, d.image_keys, d.caption_keys, lambda reason: skips.update([reason]),
                                    self.s3_opts):
            try:
                px.append(eval_resize(decode_image(r["image"], d.min_image_side, d.max_image_pixels), self.size))
            except SkipRecord as e:
                skips.update([e.reason])
                continue
            meta.append((r["key"], caption_text(r["caption"]), r.get("image_at")))
            if len(px) == bs:
                yield meta, np.stack(px)
                meta, px = [], []
        if px:
            yield meta, np.stack(px)

    def index_shard(self, path: str, model_fingerprint: str = "") -> dict:
        """Compute and store the features of shard `path`; its summary {"shard", "id", "images", "uncaptioned",
        "skipped", "seconds"}."""
        t0 = time.time()
        skips: Counter = Counter()
        feats, rows = [], {"key": [], "caption": [], "offset": [], "size": []}
        for meta, px in decode_ahead(self._decoded(path, skips), self.cfg.compute.decode_ahead):
            feats.append(self.image_features(px))
            for key, caption, at in meta:
                rows["key"].append(key)
                rows["caption"].append(caption)
                offset, size = (at if isinstance(at, (tuple, list)) else (at, -1)) if at is not None else (-1, -1)
                rows["offset"].append(int(offset))
                rows["size"].append(int(size))
        q, e = self.model.query_tokens.shape[1], self.model.cfg.qformer.embed_dim
        features = np.concatenate(feats) if feats else np.zeros((0, q, e), np.float32)
        sid = store.shard_id(path)
        summary = {"shard": path, "id": sid, "images": len(rows["key"]),
                   "uncaptioned": sum(1 for c in rows["caption"] if not c), "skipped": dict(skips),
                   "seconds": round(time.time() - t0, 3), "model": model_fingerprint,
                   "num_queries": q, "embed_dim": e}
        store.write_shard(self.cfg.output_dir, sid, features, rows, summary)
        return summary

    def __call__(self, batch: dict) -> dict:
        """Ray map_batches entry: {"path": [shard], "model": [fingerprint]} -> one summary row per shard (JSON)."""
        out = [self.index_shard(str(p), str(m)) for p, m in zip(batch["path"], batch["model"])]
        return {"summary": np.array([json.dumps(s) for s in out], dtype=object)}
