"""An index directory opened for searching, Ray-free: the FAISS index and the images table memory-mapped,
the shards' stored features (for exact scores) opened on first use."""

from __future__ import annotations

import os

import numpy as np

from blip2_ray.search import index as ix
from blip2_ray.search import store


class ImageIndex:
    """Search an index directory that `jobs/index.py` wrote. `nprobe` overrides the manifest's (IVF-PQ)."""

    def __init__(self, index_dir: str, mmap: bool = True, nprobe: int | None = None):
        import faiss

        self.dir = index_dir
        self.manifest = m = store.require_manifest(index_dir)
        flags = (faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY) if mmap else 0
        self.index = faiss.read_index(os.path.join(index_dir, m["index_file"]), flags)
        self.images = store.read_arrow(os.path.join(index_dir, m["images_file"]))
        self.kind, self.num_queries, self.dim = m["kind"], m["num_queries"], m["embed_dim"]
        self.refine = m["params"].get("refine_factor", 0) if self.kind == ix.IVFPQ else 1
        ix.set_nprobe(self.index, nprobe or m["params"].get("nprobe", 1))
        self._shards = m["shards"]
        self._starts = np.array([s["first"] for s in self._shards] + [m["num_images"]], dtype=np.int64)
        self._features: dict[int, np.ndarray] = {}

    @property
    def num_images(self) -> int:
        return int(self.manifest["num_images"])

    def features(self, ids: np.ndarray) -> np.ndarray:
        """The stored float32 features (n, Q, E) of images `ids` (flat: from the index itself; IVF-PQ: from
        the shards' feature files, memory-mapped)."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.kind == ix.FLAT:
            vec = (ids[:, None] * self.num_queries + np.arange(self.num_queries)[None, :]).reshape(-1)
            return self.index.reconstruct_batch(vec).reshape(len(ids), self.num_queries, self.dim)
        shard = np.searchsorted(self._starts, ids, side="right") - 1
        rows = self.images.column("row").to_numpy()[ids]
        out = np.empty((len(ids), self.num_queries, self.dim), np.float32)
        for s in np.unique(shard):
            if s not in self._features:
                self._features[s] = store.shard_features(self.dir, self._shards[s]["id"])
            sel = shard == s
            out[sel] = self._features[s][rows[sel]]
        return out

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top k images per query (text features (B, E) or image features (B, Q, E)): (scores, image ids)
        (B, k), best first, -inf / -1 where the collection has fewer. Scores are exact ITC scores (the
        flat index's; IVF-PQ's best refine_factor x k re-scored), PQ estimates when refine_factor is 0."""
        exact = self.kind == ix.FLAT or self.refine > 0
        return ix.search(self.index, queries, k, self.num_queries, features=self.features if exact else None,
                         refine=max(1, self.refine))

    def rows(self, ids) -> list[dict]:
        """{"key", "caption", "shard", "offset", "size"} of images `ids` (-1 skipped)."""
        ids = [int(i) for i in ids if i >= 0]
        t = self.images.take(ids).to_pydict()
        return [{"key": t["key"][j], "caption": t["caption"][j], "shard": self._shards[t["shard"][j]]["path"],
                 "offset": t["offset"][j], "size": t["size"][j]} for j in range(len(ids))]
