"""Build or grow the FAISS index of a directory from the shards stored in it, Ray-free (the job's last
step, on the driver; `jobs/index.py`).

Shards already in the index stay, in their order; shards done since are appended (an IVF-PQ index keeps
the lists and codebooks it was trained with). The index is built anew from every shard's stored features
when there is none yet, when `index.rebuild` is set, or when the kind the collection now needs differs
from the one it has (auto: flat grew past exact_max_images).
"""

from __future__ import annotations

import os

import numpy as np

from blip2_ray.errors import UserError
from blip2_ray.search import index as ix
from blip2_ray.search import store
from blip2_ray.search.config import IndexSection


def _table(entries: list[dict], out_dir: str):
    """The images table of shards `entries` ({"path", "id", "images", "first"}) in index order."""
    import pyarrow as pa

    parts = []
    for n, e in enumerate(entries):
        t = store.shard_rows(out_dir, e["id"])
        parts.append(t.append_column("shard", pa.array(np.full(t.num_rows, n, np.int32)))
                     .append_column("row", pa.array(np.arange(t.num_rows, dtype=np.int32))))
    if not parts:
        return pa.table({"key": pa.array([], pa.string()), "caption": pa.array([], pa.string()),
                         "offset": pa.array([], pa.int64()), "size": pa.array([], pa.int64()),
                         "shard": pa.array([], pa.int32()), "row": pa.array([], pa.int32())})
    return pa.concat_tables(parts)


def _training_sample(entries: list[dict], out_dir: str, num_vectors: int, want: int, seed: int = 0) -> np.ndarray:
    """`want` vectors drawn without replacement (seeded) from all shards' stored features."""
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(num_vectors, size=min(want, num_vectors), replace=False))
    out, start = [], 0
    for e in entries:
        f = store.shard_features(out_dir, e["id"])
        q, d = f.shape[1], f.shape[2]
        end = start + f.shape[0] * q
        mine = picks[(picks >= start) & (picks < end)] - start
        if len(mine):
            out.append(np.asarray(f.reshape(-1, d)[mine], dtype=np.float32))
        start = end
    return np.concatenate(out)


def update_index(out_dir: str, done: list[str], cfg: IndexSection, model: dict, data: dict,
                 num_queries: int, embed_dim: int) -> dict:
    """Put every shard of `done` (paths whose features are stored, in input order) into the index of
    `out_dir`; write the new index, images table and manifest; return the manifest."""
    import faiss

    old = store.read_manifest(out_dir)
    indexed = list(old["shards"]) if old else []
    have = {e["path"] for e in indexed}
    for path in done:
        if path not in have:
            summary = store.shard_summary(out_dir, store.shard_id(path))
            indexed.append({"path": path, "id": store.shard_id(path), "images": int(summary["images"]), "first": 0})
            have.add(path)
    first = 0
    for e in indexed:
        e["first"], first = first, first + e["images"]
    num_images = first
    kind = ix.choose_kind(cfg.kind, cfg.exact_max_images, num_images)
    params: dict = {}
    if kind == ix.IVFPQ:
        params = {**ix.ivfpq_params(num_images * num_queries, embed_dim, cfg.nlist, cfg.pq_m, cfg.train_vectors),
                  "nprobe": cfg.nprobe, "refine_factor": cfg.refine_factor}
    fresh = old is None or cfg.rebuild or old["kind"] != kind or (
        kind == ix.IVFPQ and any(old["params"].get(p) != params[p] for p in ("nlist", "pq_m")
                                 if getattr(cfg, p) is not None))
    if fresh:
        index = ix.new_index(kind, embed_dim, params)
        if kind == ix.IVFPQ:
            sample = _training_sample(indexed, out_dir, num_images * num_queries, cfg.train_vectors)
            if len(sample) < 256:
                raise UserError(f"an ivfpq index needs at least 256 vectors to train its codebooks; the collection "
                                f"has {num_images * num_queries}: use index.kind flat")
            ix.train(index, sample, cfg.use_gpu)
        new = indexed
    else:
        index = faiss.read_index(os.path.join(out_dir, old["index_file"]))
        params = {**old["params"], "nprobe": cfg.nprobe, "refine_factor": cfg.refine_factor} if kind == ix.IVFPQ \
            else old["params"]
        new = [e for e in indexed if e["path"] not in {s["path"] for s in old["shards"]}]
    for e in new:
        ix.add_images(index, store.shard_features(out_dir, e["id"]))
    if index.ntotal != num_images * num_queries:
        raise RuntimeError(f"index holds {index.ntotal} vectors, expected {num_images * num_queries}")

    version = (old["version"] + 1) if old else 1
    index_file, images_file = f"index-{version}.faiss", f"images-{version}.arrow"
    from blip2_ray.runtime.files import atomic_path

    with atomic_path(os.path.join(out_dir, index_file)) as tmp:
        faiss.write_index(index, tmp)
    store.write_arrow(os.path.join(out_dir, images_file), _table(indexed, out_dir))
    manifest = {"version": version, "model": model, "kind": kind, "factory": ix.factory_string(kind, params),
                "params": params, "num_queries": num_queries, "embed_dim": embed_dim, "num_images": num_images,
                "index_file": index_file, "images_file": images_file, "data": data, "shards": indexed}
    store.write_manifest(out_dir, manifest)  # the commit point: readers switch to the new files here
    if old:
        for name in {old["index_file"], old["images_file"]} - {index_file, images_file}:
            try:
                os.remove(os.path.join(out_dir, name))
            except FileNotFoundError:
                pass
    if not cfg.keep_features:
        for e in indexed:
            try:
                os.remove(store.shard_file(out_dir, e["id"], "npy"))
            except FileNotFoundError:
                pass
    return manifest
