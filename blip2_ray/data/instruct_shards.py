"""Instruction sources to training shards: sampling weights proportional to sqrt(size) (InstructBLIP's mixing,
overridable per source), one parquet folder per held-in source, and the fingerprint a resumed run reuses them by."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

from blip2_ray.data.annotations import _read_bytes, _write_shards, fingerprint
from blip2_ray.data.instruct import MISSING_IMAGE_FILE, InstructSource
from blip2_ray.errors import UserError


def sampling_weights(sizes: dict[str, int], overrides: dict[str, float | None] | None = None) -> dict[str, float]:
    """Each source's share of the training rows: sqrt(size) / sum of sqrt(sizes) (the paper's balancing), a
    source with an override taking that weight instead (relative to the sqrt weights of the others)."""
    overrides = overrides or {}
    raw = {n: (overrides[n] if overrides.get(n) is not None else math.sqrt(s)) for n, s in sizes.items()}
    total = sum(raw.values())
    if total <= 0:
        raise UserError("the instruct sources' sampling weights sum to 0; give at least one a weight > 0")
    return {n: w / total for n, w in raw.items()}


def write_instruct_shards(sources: list[InstructSource], shares: dict[str, float], out_dir: str,
                          records_per_shard: int, fp: str) -> dict:
    """One folder of parquet shards per source under `out_dir` (rows spread evenly over its shards), reused when
    the fingerprint matches. Returns the manifest: "train" (the folders) and "weights" (per folder, so that a
    shard visit drawn by weight gives each source its share of the rows) for data.train / data.weights, "sources"
    {name: {rows, images, shards, share, skipped}}, and the totals "files", "rows", "images", "missing_images"."""
    manifest: dict = {"fingerprint": fp, "train": [], "weights": [], "files": [], "sources": {}}
    for src in sources:
        n = len(src.entries)
        shards = max(1, math.ceil(n / records_per_shard))
        per_shard = math.ceil(n / shards)  # even spread: every visit of this source brings about as many rows

        def rows(src=src):
            cache: dict[str, bytes] = {}
            for e in src.entries:
                if e["path"] not in cache:
                    cache.clear()
                    cache[e["path"]] = _read_bytes(e["path"])
                yield {"key": e["key"], "image": cache[e["path"]], "instruction": json.dumps(e["instructions"]),
                       "caption": json.dumps(e["responses"]), "image_id": str(e["image_id"])}

        folder = os.path.join(out_dir, src.name)
        m = _write_shards(rows(), ("key", "image", "instruction", "caption", "image_id"), folder, per_shard,
                          f"{fp}/{src.name}", images=src.num_images, missing_images=src.skipped[MISSING_IMAGE_FILE])
        mean_rows = m["rows"] / max(1, len(m["files"]))
        manifest["train"].append(folder)
        manifest["weights"].append(shares[src.name] / mean_rows)  # per visit; epoch_file_order normalises
        manifest["files"] += m["files"]
        manifest["sources"][src.name] = {"kind": src.kind, "rows": m["rows"], "images": m["images"],
                                         "shards": len(m["files"]), "share": round(shares[src.name], 4),
                                         "skipped": dict(src.skipped)}
    per = manifest["sources"].values()
    manifest.update(rows=sum(s["rows"] for s in per), images=sum(s["images"] for s in per),
                    missing_images=sum(s["skipped"].get(MISSING_IMAGE_FILE, 0) for s in per),
                    skipped=dict(sum((Counter(s["skipped"]) for s in per), Counter())))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def sources_fingerprint(entries: list[tuple[str, str, str]], extra: object) -> str:
    """What identifies packed instruct shards: each (annotation file, image root, split) and `extra` (the
    templates, kinds and weights)."""
    import hashlib

    parts = [fingerprint(path, root, split) for path, root, split in entries]
    return hashlib.sha256(json.dumps([parts, extra], sort_keys=True, default=str).encode()).hexdigest()[:16]
