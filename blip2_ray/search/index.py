"""The FAISS side of image search, Ray-free: which index, how an image's Q vectors are stored and
searched, and how vector hits become a ranking of images.

An image is stored as its Q ITC query features (unit vectors, E floats each) at ids i*Q .. i*Q+Q-1, and
scored as ITC scores it (`blip2_ray.eval.retrieval.itc_similarity`): text -> image is the largest dot
product of the text feature with the image's Q vectors; image -> image the largest over all Q x Q pairs.

Why k*Q vectors give the exact top k images: image j's score is its best vector's. Every vector that
beats the k-th best image's best vector belongs to one of the k-1 images above it, so there are at most
(k-1)*Q of them, and the k-th image's best vector is among the top k*Q. A flat (exact) index searched
for k*Q vectors per query vector therefore returns exactly the top k images; the scores are then taken
from `itc_similarity` on the stored vectors, the evaluation job's own function.

The compressed index (IVF lists of 4-bit fast-scan PQ codes) returns approximate hits; its best
`refine_factor` x k images are re-scored exactly from the stored float32 features.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from blip2_ray.errors import UserError
from blip2_ray.eval.retrieval import itc_similarity

FLAT, IVFPQ = "flat", "ivfpq"

# The environment of a process that runs FAISS with more than one thread. OpenMP threads spin while they
# wait for work; on a machine whose cores are shared (CI, a busy node: 2 cores at load 30) that turned a
# 0.6 s IVF-PQ training into 47 s, and waiting passively costs nothing measurable on free cores. It must
# be set before torch is imported: torch loads its OpenMP runtime globally, FAISS's parallel regions run
# on it, and it reads the variable once, when it loads. (jobs/index.py sets it first thing; the serving
# app gives it to the search replicas; in-process callers can use one thread: faiss.omp_set_num_threads(1).)
FAISS_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def choose_kind(kind: str, exact_max_images: int, num_images: int) -> str:
    """The index kind for a collection of `num_images` (kind "auto": flat up to `exact_max_images`)."""
    if kind != "auto":
        return kind
    return FLAT if num_images <= exact_max_images else IVFPQ


def ivfpq_params(num_vectors: int, dim: int, nlist: int | None, pq_m: int | None, train_vectors: int) -> dict:
    """{"nlist", "pq_m"} of an IVF-PQ index over `num_vectors` vectors of `dim` floats."""
    trainable = min(num_vectors, train_vectors)
    if nlist is None:  # every vector added is compared with each list's centroid, on the driver: at most 256
        nlist = min(2 ** round(math.log2(max(1.0, math.sqrt(num_vectors) / 4))), 256)
    nlist = max(1, min(nlist, trainable // 39))  # k-means wants >= 39 points per centroid
    if pq_m is None:
        pq_m = max(1, dim // 8)
    if dim % pq_m:
        raise UserError(f"index.pq_m {pq_m} does not divide the feature size {dim}; pick a divisor of {dim}")
    return {"nlist": int(nlist), "pq_m": int(pq_m)}


def factory_string(kind: str, params: dict) -> str:
    """The FAISS index_factory description of an index kind."""
    if kind == FLAT:
        return "Flat"
    return f"IVF{params['nlist']},PQ{params['pq_m']}x4fs"


def new_index(kind: str, dim: int, params: dict):
    import faiss

    return faiss.index_factory(dim, factory_string(kind, params), faiss.METRIC_INNER_PRODUCT)


def train(index, vectors: np.ndarray, use_gpu: str = "auto") -> None:
    """Train an IVF-PQ index on `vectors` (V, E) float32; the IVF k-means runs on the GPUs when FAISS has them."""
    import faiss

    if index.is_trained:
        return
    ivf = faiss.extract_index_ivf(index)
    if use_gpu != "never" and hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    index.train(np.ascontiguousarray(vectors, dtype=np.float32))


def add_images(index, features: np.ndarray, chunk_images: int = 8192) -> None:
    """Append images (n, Q, E) float32 (ids continue from index.ntotal), a chunk at a time."""
    n, q, e = features.shape
    for s in range(0, n, chunk_images):
        index.add(np.ascontiguousarray(features[s:s + chunk_images], dtype=np.float32).reshape(-1, e))


def set_nprobe(index, nprobe: int) -> None:
    import faiss

    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:  # not an IVF index
        pass


def best_images(scores: np.ndarray, ids: np.ndarray, num_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Vector hits -> images: each row's hits (sorted best first, -1 = none) grouped by image (id // Q), an
    image keeping its first (best) hit. Returns (scores (B, k), images (B, k) int64), padded with -inf / -1."""
    out_s = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(ids), k), -1, dtype=np.int64)
    for b in range(len(ids)):
        valid = ids[b] >= 0
        images, sc = ids[b][valid] // num_queries, scores[b][valid]
        _, first = np.unique(images, return_index=True)
        first = np.sort(first)[:k]  # first occurrences in hit order = best first
        out_s[b, : len(first)] = sc[first]
        out_i[b, : len(first)] = images[first]
    return out_s, out_i


def _merge_rows(scores: np.ndarray, ids: np.ndarray, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Hits of `groups` consecutive rows per query (an image query's Q vectors) -> one row per query, best first."""
    b = scores.shape[0] // groups
    s, i = scores.reshape(b, -1), ids.reshape(b, -1)
    order = np.argsort(-s, axis=1, kind="stable")
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def rescore(candidates: np.ndarray, features, queries: np.ndarray, image_query: bool,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact ITC scores of candidate images (B, C) (-1 = none) against the queries, best k first.

    `features(ids) -> (n, Q, E)` gives stored vectors; text queries (B, E) score as `itc_similarity`,
    image queries (B, Q, E) as the best of `itc_similarity` over their Q vectors (the best pair).
    """
    out_s = np.full((len(candidates), k), -np.inf, dtype=np.float32)
    out_i = np.full((len(candidates), k), -1, dtype=np.int64)
    for b, row in enumerate(candidates):
        row = row[row >= 0]
        if not len(row):
            continue
        feats = torch.from_numpy(np.ascontiguousarray(features(row), dtype=np.float32))
        q = torch.from_numpy(np.ascontiguousarray(queries[b], dtype=np.float32))
        sim = itc_similarity(feats, q.reshape(-1, q.shape[-1]))  # (C, 1) text, (C, Q) image
        sim = (sim.amax(dim=1) if image_query else sim[:, 0]).numpy()
        order = np.argsort(-sim, kind="stable")[:k]
        out_s[b, : len(order)] = sim[order]
        out_i[b, : len(order)] = row[order]
    return out_s, out_i


def search(index, queries: np.ndarray, k: int, num_queries: int, *, features=None,
           refine: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The top k images of each query: text features (B, E) or image features (B, Q, E).

    Searches k' = k * refine images' worth of vectors (k' * Q per query vector), groups the hits by image,
    and, with `features(ids) -> (n, Q, E)`, re-scores the k' best images exactly (`rescore`). A flat index
    finds the exact top k with `refine` 1; an IVF-PQ index re-scores its k' best when `features` is given.
    Returns (scores (B, k) float32, images (B, k) int64), best first, padded with -inf / -1.
    """
    image_query = queries.ndim == 3
    b, e = queries.shape[0], queries.shape[-1]
    width = min(index.ntotal, max(1, k * refine) * num_queries)
    if width == 0:
        return np.full((b, k), -np.inf, np.float32), np.full((b, k), -1, np.int64)
    flat_q = np.ascontiguousarray(queries.reshape(-1, e), dtype=np.float32)
    scores, ids = index.search(flat_q, width)
    if image_query:
        scores, ids = _merge_rows(scores, ids, queries.shape[1])
    cand_s, cand = best_images(scores, ids, num_queries, max(1, k * refine))
    if features is None:
        return cand_s[:, :k], cand[:, :k]
    return rescore(cand, features, queries, image_query, k)
