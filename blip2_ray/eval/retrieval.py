"""Zero-shot image-text retrieval, Ray-free: block-wise ITC top-k, ITM re-ranking, Recall@K.

The protocol of the BLIP-2 reference (LAVIS `compute_sim_matrix`): sim(image, text) = max over the Q
query features of the cosine similarity (no temperature); for each image the top k texts and for each
text the top k images are re-scored by ITM positive logit + sim; everything outside the top k ranks
below them. Recall@K from those rankings is what LAVIS' `_report_metrics` computes.

Memory: `TopKAccumulator` consumes image features block by block, so neither all image features nor
the full N_images x N_texts matrix need to exist at once: only the text features (T, E) and the k
best (score, index) per image and per text.
"""

from __future__ import annotations

import numpy as np
import torch


def itc_similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(B, Q, E) image query features x (T, E) text features -> (B, T): max over queries of the dot product."""
    return torch.einsum("bqe,te->bqt", image_feats, text_feats).amax(dim=1)


def _merge_topk(vals_a, idx_a, vals_b, idx_b, k):
    vals = torch.cat([vals_a, vals_b], 1)
    idx = torch.cat([idx_a, idx_b], 1)
    top = vals.topk(min(k, vals.shape[1]), dim=1)
    return top.values, torch.gather(idx, 1, top.indices)


class TopKAccumulator:
    """Running ITC top-k in both directions while image feature blocks stream past.

    `add(image_index (B,), image_feats (B, Q, E))` for each block; `i2t()` -> per image (values (k,),
    text indices (k,)); `t2i()` -> (values (T, k), image indices (T, k)).
    """

    def __init__(self, text_feats: torch.Tensor, k: int):
        self.text_feats = text_feats.float()
        self.k = k
        t = text_feats.shape[0]
        self._t2i_vals = torch.full((t, 0), -float("inf"))
        self._t2i_idx = torch.zeros((t, 0), dtype=torch.long)
        self._i2t: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @torch.no_grad()
    def add(self, image_index, image_feats: torch.Tensor) -> None:
        image_index = torch.tensor(np.asarray(image_index), dtype=torch.long)  # a copy: Ray's arrays are read-only
        sim = itc_similarity(image_feats.float(), self.text_feats)  # (B, T)
        top = sim.topk(min(self.k, sim.shape[1]), dim=1)
        for row, i in enumerate(image_index.tolist()):
            self._i2t[i] = (top.values[row].numpy(), top.indices[row].numpy())
        st = sim.t()  # (T, B)
        bt = st.topk(min(self.k, st.shape[1]), dim=1)
        self._t2i_vals, self._t2i_idx = _merge_topk(self._t2i_vals, self._t2i_idx, bt.values,
                                                    image_index[bt.indices], self.k)

    def i2t(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return self._i2t

    def t2i(self) -> tuple[np.ndarray, np.ndarray]:
        return self._t2i_vals.numpy(), self._t2i_idx.numpy()


def itm_pairs(i2t: dict[int, tuple[np.ndarray, np.ndarray]], t2i_idx: np.ndarray) -> dict[int, np.ndarray]:
    """image index -> the text indices whose ITM logit is needed (its top-k texts + texts ranking it top-k).

    Grouped by image so a re-ranking pass encodes every image once.
    """
    pairs: dict[int, set[int]] = {i: set(idx.tolist()) for i, (_, idx) in i2t.items()}
    for t, imgs in enumerate(t2i_idx):
        for i in imgs.tolist():
            pairs.setdefault(int(i), set()).add(t)
    return {i: np.array(sorted(ts), dtype=np.int64) for i, ts in pairs.items()}


def rerank(i2t: dict[int, tuple[np.ndarray, np.ndarray]], t2i_vals: np.ndarray, t2i_idx: np.ndarray,
           itm: dict[tuple[int, int], float]) -> tuple[dict[int, np.ndarray], list[np.ndarray]]:
    """Rankings after re-scoring each top-k candidate by ITM logit + ITC similarity.

    itm {(image, text): positive ITM logit}. Returns ({image: text indices best first}, [per text: image
    indices best first]).
    """
    ranked_i2t = {}
    for i, (vals, idx) in i2t.items():
        score = np.array([itm[(i, int(t))] for t in idx]) + vals
        ranked_i2t[i] = idx[np.argsort(-score, kind="stable")]
    ranked_t2i = []
    for t in range(t2i_idx.shape[0]):
        idx, vals = t2i_idx[t], t2i_vals[t]
        score = np.array([itm[(int(i), t)] for i in idx]) + vals
        ranked_t2i.append(idx[np.argsort(-score, kind="stable")])
    return ranked_i2t, ranked_t2i


def recall_at_k(ranked_i2t: dict[int, np.ndarray] | list[np.ndarray], img2txt: dict[int, list[int]] | list[list[int]],
                ranked_t2i: list[np.ndarray], txt2img: list, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in percent: txt_r{K} (image -> text: any of its captions in the top K), img_r{K}
    (text -> image: its image, or any of several when txt2img[t] is a collection), their means and
    r_mean. Rankings may be truncated (top k): absent = not found."""
    if isinstance(ranked_i2t, list):
        ranked_i2t = dict(enumerate(ranked_i2t))
    if isinstance(img2txt, list):
        img2txt = dict(enumerate(img2txt))

    def first_hit(ranking: np.ndarray, wanted: set[int]) -> float:
        for pos, x in enumerate(ranking.tolist()):
            if x in wanted:
                return pos
        return float("inf")

    tr = np.array([first_hit(ranked_i2t[i], set(img2txt[i])) for i in ranked_i2t])
    def as_set(x) -> set[int]:
        return {int(x)} if np.isscalar(x) else {int(v) for v in x}

    ir = np.array([first_hit(ranked_t2i[t], as_set(txt2img[t])) for t in range(len(ranked_t2i))])
    out = {f"txt_r{k}": 100.0 * float(np.mean(tr < k)) for k in ks}
    out.update({f"img_r{k}": 100.0 * float(np.mean(ir < k)) for k in ks})
    out["txt_r_mean"] = float(np.mean([out[f"txt_r{k}"] for k in ks]))
    out["img_r_mean"] = float(np.mean([out[f"img_r{k}"] for k in ks]))
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def dense_rankings(score_i2t: np.ndarray, score_t2i: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Full rankings of dense score matrices (N_img, N_txt) and (N_txt, N_img), best first."""
    return [np.argsort(-r, kind="stable") for r in score_i2t], [np.argsort(-r, kind="stable") for r in score_t2i]
