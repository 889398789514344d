"""Retrieval maths on hand-made matrices: Recall@K, block-wise top-k == dense top-k, re-ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip2_ray.eval.retrieval import TopKAccumulator, dense_rankings, itc_similarity, itm_pairs, recall_at_k, rerank


def test_recall_on_a_hand_made_matrix():
    # 3 images, 6 texts (2 per image: texts 2i, 2i+1 describe image i)
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    s = np.array([
        [0.9, 0.1, 0.8, 0.0, 0.0, 0.0],  # image 0: its text 0 first -> rank 0
        [0.7, 0.0, 0.1, 0.2, 0.0, 0.0],  # image 1: text 0 (wrong) first, its text 3 second -> rank 1
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],  # image 2: its text 4 is 5th -> rank 4
    ])
    ri, rt = dense_rankings(s, s.T.copy())
    out = recall_at_k(ri, img2txt, rt, txt2img, ks=(1, 2, 5))
    assert out["txt_r1"] == pytest.approx(100 / 3)
    assert out["txt_r2"] == pytest.approx(200 / 3)
    assert out["txt_r5"] == pytest.approx(100.0)
    # text -> image, column by column: t0 [i0 .9, i2 .9] stable -> i0 first; t1 [i2 .8 > i0 .1] -> rank 1;
    # t2 [i0 .8, i2 .7, i1 .1] -> rank 2; t3 [i2 .6, i1 .2] -> rank 1; t4 [i2 .5] -> rank 0; t5 [i2 .1] -> 0
    assert out["img_r1"] == pytest.approx(300 / 6)
    assert out["img_r2"] == pytest.approx(500 / 6)
    assert out["r_mean"] == pytest.approx((out["txt_r_mean"] + out["img_r_mean"]) / 2)


def test_itc_similarity_is_max_over_queries():
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, Q=2, E=2)
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0], [-1.0, 0.0]])
    assert itc_similarity(img, txt)[0].tolist() == pytest.approx([0.8, 1.0, 0.0])


def test_blockwise_topk_equals_dense():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(23, 4, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(31, 8, generator=g), dim=-1)
    k = 5
    acc = TopKAccumulator(txt, k)
    order = torch.randperm(23, generator=g)  # blocks arrive in any order
    for start in range(0, 23, 4):
        idx = order[start:start + 4]
        acc.add(idx.numpy(), img[idx])
    dense = itc_similarity(img, txt)
    for i in range(23):
        vals, idx = acc.i2t()[i]
        assert np.allclose(vals, dense[i].topk(k).values.numpy())
        assert set(idx.tolist()) == set(dense[i].topk(k).indices.tolist())
    tv, ti = acc.t2i()
    assert np.allclose(tv, dense.t().topk(k, dim=1).values.numpy(), atol=1e-6)
    assert (np.sort(ti, 1) == np.sort(dense.t().topk(k, dim=1).indices.numpy(), 1)).all()


def test_rerank_uses_itm_plus_itc():
    # one image, 3 texts: ITC prefers text 0, ITM strongly prefers text 2
    i2t = {0: (np.array([0.9, 0.5, 0.4]), np.array([0, 1, 2]))}
    t2i_vals, t2i_idx = np.array([[0.9], [0.5], [0.4]]), np.array([[0], [0], [0]])
    pairs = itm_pairs(i2t, t2i_idx)
    assert pairs[0].tolist() == [0, 1, 2]
    itm = {(0, 0): 0.0, (0, 1): 0.2, (0, 2): 3.0}
    ri, rt = rerank(i2t, t2i_vals, t2i_idx, itm)
    assert ri[0].tolist() == [2, 0, 1]
    assert [r.tolist() for r in rt] == [[0], [0], [0]]


def test_identical_texts_count_as_hits():
    from blip2_ray.eval.test_sets import TestSet, ground_truth

    ts = TestSet(images=[{}, {}, {}], texts=["a red circle", "a blue square", "a red circle"],
                 txt2img=[0, 1, 2], img2txt=[[0], [1], [2]])
    assert ground_truth(ts, False) == (ts.img2txt, ts.txt2img)
    img2txt, txt2img = ground_truth(ts, True)
    assert img2txt == [[0, 2], [1], [0, 2]] and txt2img == [[0, 2], [1], [0, 2]]
    # image 2 retrieving text 0 is a hit once identical texts count
    ri = [np.array([2, 0, 1]), np.array([1, 0, 2]), np.array([0, 1, 2])]
    rt = [np.array([2, 0, 1]), np.array([1, 0, 2]), np.array([0, 2, 1])]
    assert recall_at_k(ri, img2txt, rt, txt2img, ks=(1,))["txt_r1"] == pytest.approx(100.0)
    assert recall_at_k(ri, ts.img2txt, rt, ts.txt2img, ks=(1,))["txt_r1"] == pytest.approx(100 / 3)
