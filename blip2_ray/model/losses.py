"""Stage-1 objectives as plain functions: ITC, hard-negative sampling for ITM, ITM and ITG.

Distribution is injected, never assumed: `gather(x)` concatenates `x` over ranks along dim 0 without
gradient (world size 1: identity), `rank` offsets the targets. Everything runs at world size 1.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from blip2_ray.model.precision import at_least_float32, autocast_off

Gather = Callable[[torch.Tensor], torch.Tensor]


def identity_gather(x: torch.Tensor) -> torch.Tensor:
    return x


def itc_similarities(
    image_feats: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor, gather: Gather = identity_gather
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC logits of the local batch against the global one.

    image_feats: (B, Q, E) L2-normalised query features; text_feat: (B, E) normalised [CLS] features.
    Returns sim_i2t (B, W*B) and sim_t2i (B, W*B), float32 even under autocast: the max over the Q
    queries of the dot product, / temp. The other ranks' features come through `gather` with no
    gradient (as in the reference): each rank back-propagates through its own rows only.
    """
    image_all = gather(image_feats.detach())  # (W*B, Q, E)
    text_all = gather(text_feat.detach())  # (W*B, E)
    with autocast_off(image_feats.device.type):  # float32 similarities and division by temp (docs/training.md)
        image_feats, text_feat = at_least_float32(image_feats), at_least_float32(text_feat)
        temp = at_least_float32(temp)
        sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, at_least_float32(text_all)).amax(-1) / temp
        sim_t2i = torch.einsum("be,nqe->bnq", text_feat, at_least_float32(image_all)).amax(-1) / temp
    return sim_i2t, sim_t2i


def itc_loss(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, rank: int = 0, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Mean of image->text and text->image cross-entropy; targets are the rank-offset diagonal."""
    b = sim_i2t.shape[0]
    targets = torch.arange(b, device=sim_i2t.device) + rank * b
    return (
        F.cross_entropy(at_least_float32(sim_i2t), targets, label_smoothing=label_smoothing)
        + F.cross_entropy(at_least_float32(sim_t2i), targets, label_smoothing=label_smoothing)
    ) / 2


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, rank: int = 0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per sample, drawn from softmax(similarity) over the global batch.

    Returns (neg_image_idx, neg_text_idx), each (B,) indices into the global batch: a negative image
    for each local text (from sim_t2i) and a negative text for each local image (from sim_i2t). The
    positive gets probability 0, so it is never drawn. Vectorised: one torch.multinomial per matrix.
    """
    b, n = sim_i2t.shape
    if n < 2:
        raise ValueError("ITM hard negatives need a global batch of at least 2 samples")
    pos = torch.arange(b, device=sim_i2t.device) + rank * b

    def weights(sim: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(sim.float(), dim=1)
        w[torch.arange(b, device=sim.device), pos] = 0.0
        w = torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
        # a row whose mass underflowed to 0 falls back to uniform over the negatives
        empty = w.sum(1, keepdim=True) <= 0
        uniform = torch.ones_like(w)
        uniform[torch.arange(b, device=sim.device), pos] = 0.0
        return torch.where(empty, uniform, w)

    neg_image = torch.multinomial(weights(sim_t2i), 1, generator=generator).squeeze(1)
    neg_text = torch.multinomial(weights(sim_i2t), 1, generator=generator).squeeze(1)
    return neg_image, neg_text


def itm_loss(itm_logits: torch.Tensor, num_positive: int) -> torch.Tensor:
    """Plain CE on (3B, 2) logits ordered (positives, text+neg image, neg text+image): labels 1, 0, 0."""
    labels = torch.zeros(itm_logits.shape[0], dtype=torch.long, device=itm_logits.device)
    labels[:num_positive] = 1
    return F.cross_entropy(at_least_float32(itm_logits), labels)


def itg_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions that predict a caption token, so that only they go through the LM head.

    `labels` (B, T) hold the decoder input ids ([DEC] first) with padding set to -100; position t
    predicts labels[:, t + 1]. Returns (positions (N,), targets (N,)): flat indices into the (B*T)
    positions, row-major, and the token each predicts. (One host sync on a GPU: N is data-dependent.)
    """
    following = F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)  # the last position predicts nothing
    positions = (following != -100).nonzero().squeeze(1)
    return positions, following[positions]


def itg_loss(lm_logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Caption generation loss: mean label-smoothed CE of (N, V) logits at the positions of `itg_targets`."""
    return F.cross_entropy(at_least_float32(lm_logits), targets, label_smoothing=label_smoothing)
