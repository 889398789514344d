"""The search deployment: an image index (memory-mapped) and the stage-1 model that built it, behind
POST /v1/search (the route is in `ingress.py`; the work is `blip2_ray.search.engine.SearchEngine`).

Its own deployment, so the index's memory and the re-ranking's image reads scale apart from the
caption and retrieval replicas. Requests arrive validated by the ingress: a text, or an image already
decoded and resized to uint8 (3, H, W), normalised here on the replica's device.
"""

from __future__ import annotations

import asyncio

import numpy as np


class SearchDeployment:
    def __init__(self, index_dir: str, model_dir: str, device: str = "cpu", dtype: str = "float32",
                 query_max_tokens: int = 32, itm_batch_size: int = 128, nprobe: int | None = None,
                 faiss_threads: int = 1, s3_opts: dict | None = None):
        import faiss

        from blip2_ray.search.engine import SearchEngine
        from blip2_ray.serve.images import pixel_normalizer

        faiss.omp_set_num_threads(max(1, faiss_threads))
        self.engine = SearchEngine(index_dir, model_dir, device, dtype, query_max_tokens, itm_batch_size, nprobe,
                                   s3_opts=s3_opts)
        self.normalise = pixel_normalizer(model_dir, self.engine.device)
        self.lock = asyncio.Lock()  # one search at a time per replica: the model and FAISS use all its CPUs

    def info(self) -> dict:
        m = self.engine.index.manifest
        return {"images": m["num_images"], "kind": m["kind"], "factory": m["factory"], "model": m["model"]["name"]}

    async def search_text(self, text: str, k: int, candidates: int, rerank: bool) -> dict:
        async with self.lock:
            return await asyncio.to_thread(self.engine.search_text, text, k, candidates, rerank)

    async def search_image(self, pixel_values: np.ndarray, k: int) -> dict:
        async with self.lock:
            return await asyncio.to_thread(self.engine.search_image, self.normalise(pixel_values), k)
