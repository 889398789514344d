"""Search requests against an index directory with the stage-1 model that built it, Ray-free (the serving
app's SearchDeployment wraps it; tests and benchmarks call it directly).

Text query: Q-Former text feature -> the k' (`candidates`, 128 by default) best images by ITC from the
index -> each candidate's image read back from its shard and decoded as the evaluation job decodes
(`eval.actors.decode_rows`) -> ITM logit of (candidate, text) -> ranked by ITM + ITC with the evaluation
job's `rerank`, the paper's re-ranking. Image query: the image's Q query features -> the top k images
by ITC image-image (the best of the Q x Q dot products), no re-ranking.
"""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from blip2_ray.config import from_dict
from blip2_ray.data.config import DataConfig
from blip2_ray.data.processor import tokenize_qformer
from blip2_ray.data.readers import read_images_at
from blip2_ray.data.sources import storage_options
from blip2_ray.eval.actors import decode_rows
from blip2_ray.eval.retrieval import rerank
from blip2_ray.search import store
from blip2_ray.search.index_dir import ImageIndex


class SearchEngine:
    """An index directory and the stage-1 model it was built with (UserError naming both if not)."""

    def __init__(self, index_dir: str, model_dir: str, device: str = "cpu", dtype: str = "float32",
                 query_max_tokens: int = 32, itm_batch_size: int = 128, nprobe: int | None = None,
                 fetch_threads: int = 8, s3_opts: dict | None = None):
        """`s3_opts`: how to read S3 shards back (data.sources.storage_options); None resolves them here from
        the index's data settings and this process's AWS environment."""
        from blip2_ray.weights.hf_format import load_stage1

        manifest = store.require_manifest(index_dir)
        store.same_model_or_error(manifest["model"], store.model_identity(model_dir), index_dir)
        self.index = ImageIndex(index_dir, mmap=True, nprobe=nprobe)
        self.device = torch.device(device)
        model, self.tokenizer = load_stage1(model_dir, vision_dtype=dtype)
        self.model = model.to(self.device).eval()
        self.size = self.model.vision_model.config.image_size
        self.query_max_tokens, self.itm_batch_size = query_max_tokens, itm_batch_size
        d = manifest["data"]
        self.data = from_dict(DataConfig, {k: d[k] for k in ("image_keys", "caption_keys", "min_image_side",
                                                              "max_image_pixels")})
        self.s3_opts = s3_opts if s3_opts is not None else index_storage_options(manifest)
        self.fetch_threads = fetch_threads

    # ---------------------------------------------------------------------------------------- text
    def tokens(self, text: str) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(input ids (1, L), mask (1, L), tokens the whole text has) as the evaluation job tokenises
        (`tokenize_qformer`, padded to query_max_tokens); more tokens than L means truncated."""
        enc = tokenize_qformer(self.tokenizer, [text], self.query_max_tokens)
        n = len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return (torch.from_numpy(enc["qformer_input_ids"]).to(self.device),
                torch.from_numpy(enc["qformer_attention_mask"]).to(self.device), n)

    @torch.no_grad()
    def search_text(self, text: str, k: int, candidates: int = 128, rerank_itm: bool = True) -> dict:
        """{"results": [{"id", "key", "caption", "shard", "score", "itc"[, "itm"]}], "query_tokens",
        "truncated", "candidates", "unreadable"} for the top k images of `text`."""
        ids, mask, n_tokens = self.tokens(text)
        feat = self.model.text_feat(ids, mask).float().cpu().numpy()  # (1, E)
        width = max(k, candidates) if rerank_itm else k
        itc, cand = self.index.search(feat, width)
        itc, cand = itc[0][cand[0] >= 0], cand[0][cand[0] >= 0]
        out = {"query_tokens": n_tokens, "truncated": n_tokens > self.query_max_tokens, "unreadable": 0,
               "candidates": int(len(cand))}
        if not rerank_itm:
            out["results"] = [_result(i, r, s, s) for i, s, r in zip(cand[:k], itc[:k], self.index.rows(cand[:k]))]
            return out
        itm, kept = self.itm_logits(cand, ids, mask)
        out["unreadable"] = int(len(cand) - len(kept))
        pos = {int(i): p for p, i in enumerate(cand)}
        vals, idx = itc[[pos[i] for i in kept]], np.asarray(kept, dtype=np.int64)
        # the evaluation job's re-ranking: ITM logit + ITC similarity, stable order by ITC rank on ties
        _, ranked = rerank({}, vals[None], idx[None], {(int(i), 0): float(v) for i, v in zip(kept, itm)})
        top = ranked[0][:k]
        itm_of = dict(zip((int(i) for i in kept), itm))
        itc_of = dict(zip((int(i) for i in idx), vals))
        out["results"] = [_result(i, r, itm_of[int(i)] + itc_of[int(i)], itc_of[int(i)], itm_of[int(i)])
                          for i, r in zip(top, self.index.rows(top))]
        return out

    def fetch(self, ids: np.ndarray) -> list[bytes | None]:
        """The image bytes of images `ids`, read back from their shards (None where unreadable now)."""
        rows = self.index.rows(ids)
        by_shard: dict[str, list[int]] = defaultdict(list)
        for j, r in enumerate(rows):
            by_shard[r["shard"]].append(j)
        out: list[bytes | None] = [None] * len(rows)

        def read(shard: str) -> None:
            js = by_shard[shard]
            pos = [(rows[j]["offset"], rows[j]["size"]) if rows[j]["size"] >= 0 else rows[j]["offset"] for j in js]
            for j, data in zip(js, read_images_at(shard, pos, self.data.image_keys, self.s3_opts)):
                out[j] = data

        with ThreadPoolExecutor(max(1, min(self.fetch_threads, len(by_shard)))) as pool:
            list(pool.map(read, list(by_shard)))
        return out

    def itm_logits(self, cand: np.ndarray, ids: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, list[int]]:
        """Positive ITM logits of (candidate image, text) as the evaluation job computes them, and the
        candidates they are for (those whose image could be read and decoded)."""
        raw = self.fetch(cand)
        have = [j for j, b in enumerate(raw) if b]
        batch = {"idx": np.asarray(have, dtype=np.int64), "path": np.array([""] * len(have), dtype=object),
                 "image": [raw[j] for j in have]}
        keep, px = decode_rows(batch, self.size, self.data)
        kept = [int(cand[have[j]]) for j in keep]
        logits = []
        for s in range(0, len(kept), self.itm_batch_size):
            chunk = torch.from_numpy(px[s:s + self.itm_batch_size]).to(self.device)
            embeds = self.model.encode_image(chunk)
            n = embeds.shape[0]
            logits.append(self.model.itm_logits(embeds, ids.expand(n, -1), mask.expand(n, -1))[:, 1].float().cpu())
        return (torch.cat(logits).numpy() if logits else np.zeros(0, np.float32)), kept

    # --------------------------------------------------------------------------------------- image
    @torch.no_grad()
    def search_image(self, pixel_values: torch.Tensor, k: int) -> dict:
        """Normalised pixels (1, 3, S, S) -> {"results": [{"id", "key", "caption", "shard", "score", "itc"}]}."""
        feats = self.model.image_feats(self.model.encode_image(pixel_values.to(self.device))).float().cpu().numpy()
        itc, cand = self.index.search(feats, k)
        ok = cand[0] >= 0
        rows = self.index.rows(cand[0][ok])
        return {"results": [_result(i, r, s, s) for i, s, r in zip(cand[0][ok], itc[0][ok], rows)]}


def index_storage_options(manifest: dict) -> dict:
    """How to read an index's S3 shards back: its data settings + this process's AWS environment."""
    d = manifest["data"]
    return storage_options(d.get("s3_endpoint_url"), d.get("s3_anonymous", False), d.get("s3_region"))


def _result(image: int, row: dict, score: float, itc: float, itm: float | None = None) -> dict:
    out = {"id": int(image), "key": row["key"], "caption": row["caption"], "shard": row["shard"],
           "score": float(score), "itc": float(itc)}
    if itm is not None:
        out["itm"] = float(itm)
    return out
