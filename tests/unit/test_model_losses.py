"""Each stage-1 objective against a small, obviously-correct reference written here with loops."""

import math

import pytest
import torch
import torch.nn.functional as F

from blip2_ray.model import losses
from blip2_ray.model.qformer_passes import decoder_mask


def ce_smoothed(logits_row, target, eps):
    """Cross-entropy with label smoothing for one row, written out."""
    logp = torch.log_softmax(logits_row.double(), 0)
    n = logits_row.numel()
    return -((1 - eps) * logp[target] + eps * logp.sum() / n)


def reference_itc(img_feats_per_rank, txt_feats_per_rank, temp, eps):
    """Loss of every rank computed with loops over samples and queries; returns the per-rank losses."""
    img_all = torch.cat(img_feats_per_rank)
    txt_all = torch.cat(txt_feats_per_rank)
    out = []
    for rank, (img, txt) in enumerate(zip(img_feats_per_rank, txt_feats_per_rank)):
        b = img.shape[0]
        total = 0.0
        for i in range(b):
            target = rank * b + i
            qs = range(img.shape[1])
            i2t = torch.tensor([max(float(img[i, q] @ txt_all[j]) for q in qs) for j in range(len(txt_all))]) / temp
            t2i = torch.tensor([max(float(txt[i] @ img_all[j, q]) for q in qs) for j in range(len(img_all))]) / temp
            total += (ce_smoothed(i2t, target, eps) + ce_smoothed(t2i, target, eps)) / 2
        out.append(total / b)
    return out


def test_itc_matches_loop_reference_with_world_size_2_simulated():
    torch.manual_seed(0)
    b, q, e, w = 3, 4, 8, 2
    imgs = [F.normalize(torch.randn(b, q, e), dim=-1) for _ in range(w)]
    txts = [F.normalize(torch.randn(b, e), dim=-1) for _ in range(w)]
    temp = torch.tensor(0.07)
    expected = reference_itc(imgs, txts, 0.07, 0.1)

    for rank in range(w):
        def gather(x, rank=rank):
            # what all_gather gives every rank: the ranks' tensors in rank order
            parts = imgs if x.dim() == 3 else txts
            return torch.cat([p if r != rank else x for r, p in enumerate(parts)])

        sim_i2t, sim_t2i = losses.itc_similarities(imgs[rank], txts[rank], temp, gather)
        assert sim_i2t.shape == (b, w * b)
        loss = losses.itc_loss(sim_i2t, sim_t2i, rank=rank, label_smoothing=0.1)
        assert loss.item() == pytest.approx(float(expected[rank]), rel=1e-5)


def test_itc_gradient_flows_through_local_features_only():
    torch.manual_seed(1)
    img = F.normalize(torch.randn(2, 3, 4), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(2, 4), dim=-1).requires_grad_()
    other = F.normalize(torch.randn(2, 3, 4), dim=-1).requires_grad_()
    gathered_inputs = []

    def gather(x):
        gathered_inputs.append(x)
        return torch.cat([x, other.detach()]) if x.dim() == 3 else torch.cat([x, torch.zeros_like(x)])

    s1, s2 = losses.itc_similarities(img, txt, torch.tensor(0.1), gather)
    losses.itc_loss(s1, s2).backward()
    assert all(not t.requires_grad for t in gathered_inputs)  # the gather sees detached tensors
    assert img.grad is not None and txt.grad is not None and other.grad is None


def test_hard_negatives_never_the_positive_and_follow_softmax():
    torch.manual_seed(0)
    b, w, rank = 4, 2, 1
    n = b * w
    sim = torch.randn(b, n) * 2
    # make the positive very likely, so a bug that forgets to mask it would show up at once
    pos = torch.arange(b) + rank * b
    sim[torch.arange(b), pos] = 50.0
    draws = 20000
    counts = torch.zeros(b, n)
    g = torch.Generator().manual_seed(0)
    for _ in range(draws // 500):
        neg_img, _ = losses.sample_hard_negatives(sim, sim, rank=rank, generator=g)
        counts[torch.arange(b), neg_img] += 1
    # the positive is never drawn
    assert counts[torch.arange(b), pos].sum() == 0
    # frequencies follow softmax(sim) restricted to the negatives (chi-square-like tolerance)
    rounds = draws // 500
    for i in range(b):
        w_ = torch.softmax(sim[i], 0)
        w_[pos[i]] = 0
        w_ = w_ / w_.sum()
        freq = counts[i] / rounds
        assert torch.allclose(freq, w_, atol=4 * math.sqrt(0.25 / rounds))


def test_hard_negatives_statistics_many_draws():
    """2000 draws for one sample (positive = column 0): frequencies match the masked softmax."""
    sim_row = torch.tensor([0.0, 1.0, 2.0, 0.5])
    g = torch.Generator().manual_seed(3)
    picks = []
    for _ in range(2000):
        neg, _ = losses.sample_hard_negatives(sim_row[None], sim_row[None], rank=0, generator=g)
        picks.append(int(neg))
    picks = torch.tensor(picks)
    assert (picks == 0).sum() == 0
    w = torch.softmax(sim_row, 0)[1:]
    w = w / w.sum()
    freq = torch.stack([(picks == k).float().mean() for k in (1, 2, 3)])
    assert torch.allclose(freq, w, atol=0.04)


def test_hard_negatives_need_two_samples():
    with pytest.raises(ValueError):
        losses.sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1))


def test_itm_loss_labels_one_then_zeros():
    logits = torch.randn(6, 2)
    expected = sum(
        -torch.log_softmax(logits[i], 0)[1 if i < 2 else 0] for i in range(6)
    ) / 6
    assert losses.itm_loss(logits, 2).item() == pytest.approx(expected.item(), rel=1e-6)


def test_itg_loss_shifts_and_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[3, 1, 2, -100, -100], [3, 4, 5, 6, 0]])
    total, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            total += float(ce_smoothed(logits[b, t], target, 0.1))
            count += 1
    targets = losses.itg_targets(labels)
    # (b, t) -> b * 5 + t predicts labels[b, t + 1]; padding and each row's last position predict nothing
    assert targets.tolist() == [1, 2, -100, -100, -100, 4, 5, 6, 0, -100]
    loss = losses.itg_loss(logits.flatten(0, 1), targets, 0.1)
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_decoder_mask_rules():
    text_mask = torch.tensor([[1, 1, 1, 0]])
    nq = 2
    allowed = decoder_mask(nq, text_mask)[0, 0]  # (4 text rows, 2 query + 4 text keys)
    assert allowed.shape == (4, 6) and allowed.dtype == torch.bool
    for i in range(4):
        for j in range(6):
            expect = j < nq or (j - nq <= i and text_mask[0, j - nq] == 1)  # all queries, earlier real text
            assert bool(allowed[i, j]) == expect, (i, j)
