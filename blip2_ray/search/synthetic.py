"""Synthetic ITC features for measuring indexes beyond what a model can index in minutes, Ray-free.

Each image belongs to one of `topics` topics; its centre is the topic's unit vector plus noise
(`spread`), and its Q query vectors are the centre plus more noise (`jitter`), all normalised, as real
Q-Former features cluster by content and an image's queries resemble one another. With the defaults a
query's best ITC score against an image of its topic is ~0.7 and ~0.06 against others. A text query
is a topic plus noise. Every value is a pure function of the image id (hashed indices into a fixed
noise pool), so any subset of a collection of 10^6 or more images can be regenerated without storing it.
"""

from __future__ import annotations

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of uint64 values: independent-looking hashes of consecutive ids."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
    return x ^ (x >> np.uint64(31))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class SyntheticCollection:
    """`num_images` images of Q unit vectors of E floats, reproducible from `seed`."""

    def __init__(self, num_images: int, num_queries: int = 32, dim: int = 256, topics: int = 1000, seed: int = 0,
                 spread: float = 0.9, jitter: float = 0.6, pool: int = 1 << 16):
        rng = np.random.default_rng(seed)
        self.num_images, self.num_queries, self.dim = num_images, num_queries, dim
        self.topics = _unit(rng.standard_normal((topics, dim))).astype(np.float32)
        self.pool = (rng.standard_normal((pool, dim)) / np.sqrt(dim)).astype(np.float32)
        self.spread, self.jitter, self.seed = spread, jitter, np.uint64(seed)

    def _draw(self, ids: np.ndarray, salt: int, n: int) -> np.ndarray:
        return (_mix(ids.astype(np.uint64) * np.uint64(4099) + np.uint64(salt) + self.seed) % np.uint64(n)).astype(
            np.int64)

    def features(self, ids) -> np.ndarray:
        """(n, Q, E) float32 features of images `ids`."""
        ids = np.asarray(ids, dtype=np.int64)
        centre = _unit(self.topics[self._draw(ids, 1, len(self.topics))] +
                       self.spread * self.pool[self._draw(ids, 2, len(self.pool))]).astype(np.float32)
        out = np.empty((len(ids), self.num_queries, self.dim), np.float32)
        step = 256  # images per pass: the buffers stay in cache
        for s in range(0, len(ids), step):
            part = ids[s:s + step]
            per_query = part[:, None] * self.num_queries + np.arange(self.num_queries)[None, :]
            buf = out[s:s + step]
            np.take(self.pool, self._draw(per_query, 3, len(self.pool)), axis=0, out=buf)
            buf *= self.jitter
            buf += centre[s:s + step, None, :]
            buf /= np.sqrt(np.einsum("nqe,nqe->nq", buf, buf))[..., None]
        return out

    def chunks(self, size: int = 8192):
        """(first id, features (n, Q, E)) over the whole collection, in order."""
        for start in range(0, self.num_images, size):
            yield start, self.features(np.arange(start, min(start + size, self.num_images)))

    def text_queries(self, n: int, seed: int = 1) -> np.ndarray:
        """(n, E) unit text features, each a random topic plus noise."""
        rng = np.random.default_rng(seed)
        t = self.topics[rng.integers(len(self.topics), size=n)]
        return _unit(t + self.spread * self.pool[rng.integers(len(self.pool), size=n)]).astype(np.float32)

    def image_queries(self, n: int, seed: int = 2) -> np.ndarray:
        """(n, Q, E) features of images from outside the collection (ids past its end)."""
        return self.features(self.num_images + np.random.default_rng(seed).integers(1 << 30, size=n))


class ExactTop:
    """The exact top k images of text queries (B, E) over chunks of a collection added in order, through a
    flat index per chunk (the top k*Q vectors hold the top k images: see search/index.py)."""

    def __init__(self, queries: np.ndarray, k: int, num_queries: int):
        self.queries, self.k, self.q = np.ascontiguousarray(queries, dtype=np.float32), k, num_queries
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.ids = np.zeros((len(queries), 0), np.int64)

    def add(self, start: int, feats: np.ndarray) -> None:
        """Images start .. start+n-1, features (n, Q, E)."""
        import faiss

        flat = faiss.IndexFlatIP(feats.shape[-1])
        flat.add(np.ascontiguousarray(feats.reshape(-1, feats.shape[-1])))
        width = self.k * self.q
        s, i = flat.search(self.queries, min(width, flat.ntotal))
        s = np.concatenate([self.scores, s], 1)
        i = np.concatenate([self.ids, i + start * self.q], 1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :width]
        self.scores, self.ids = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)

    def top(self) -> np.ndarray:
        """(B, k) image ids, best first."""
        from blip2_ray.search.index import best_images

        return best_images(self.scores, self.ids, self.q, self.k)[1]


def exact_top_images(collection: SyntheticCollection, queries: np.ndarray, k: int,
                     chunk: int = 8192) -> np.ndarray:
    """The exact top k images (B, k) of text queries (B, E) over a whole synthetic collection."""
    top = ExactTop(queries, k, collection.num_queries)
    for start, feats in collection.chunks(chunk):
        top.add(start, feats)
    return top.top()
