"""Stage-1 objectives as plain functions: ITC, hard-negative sampling for ITM, ITM and ITG.

Distribution is injected, never assumed: `gather(x)` concatenates `x` over ranks along dim 0 without
gradient (world size 1: identity), `rank` offsets the targets. Everything runs at world size 1.

No function here reads a tensor's value on the host (no `.item()`, `nonzero()`, data-dependent shape or Python
branch on a value): on a GPU the step never waits for the device, and each objective compiles with
`torch.compile(fullgraph=True)` (tests/unit/test_model_compile.py).
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
    return itc_logits(image_feats, text_feat, gather(image_feats.detach()), gather(text_feat.detach()), temp)


def itc_logits(image_feats: torch.Tensor, text_feat: torch.Tensor, image_all: torch.Tensor, text_all: torch.Tensor,
               temp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`itc_similarities` given the gathered features: image_all (W*B, Q, E), text_all (W*B, E) (no gradient)."""
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


def itc_objective(image_feats: torch.Tensor, text_feat: torch.Tensor, image_all: torch.Tensor, text_all: torch.Tensor,
                  temp: torch.Tensor, rank: int = 0,
                  label_smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sim_i2t, sim_t2i, ITC loss) from the local and the gathered features (`itc_logits`, `itc_loss`)."""
    sim_i2t, sim_t2i = itc_logits(image_feats, text_feat, image_all, text_all, temp)
    return sim_i2t, sim_t2i, itc_loss(sim_i2t, sim_t2i, rank, label_smoothing)


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, rank: int = 0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One hard negative per sample, drawn from softmax(similarity) over the global batch.

    Returns (neg_image_idx, neg_text_idx), each (B,) indices into the global batch: a negative image
    for each local text (from sim_t2i) and a negative text for each local image (from sim_i2t). The
    positive gets probability 0, so it is never drawn. Drawn as argmax(w / q) with q ~ Exp(1), which is
    what torch.multinomial does for one sample (the same draws from the same generator) without its two
    host reads of the weights' validity (a device sync per call on a GPU).
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

    return draw_one(weights(sim_t2i), generator), draw_one(weights(sim_i2t), generator)


def draw_one(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) non-negative weights, rows not all zero -> (B,) indices drawn with probability weights / row sum.

    torch.multinomial(weights, 1) without a host sync: argmax(w / q), q ~ Exp(1) (the exponential race; the same
    numbers as multinomial's one-sample path from the same generator).
    """
    q = torch.empty_like(weights).exponential_(generator=generator)
    return (weights / q).argmax(1)


def itm_loss(itm_logits: torch.Tensor, num_positive: int) -> torch.Tensor:
    """Plain CE on (3B, 2) logits ordered (positives, text+neg image, neg text+image): labels 1, 0, 0."""
    labels = torch.zeros(itm_logits.shape[0], dtype=torch.long, device=itm_logits.device)
    labels[:num_positive] = 1
    return F.cross_entropy(at_least_float32(itm_logits), labels)


def itg_targets(labels: torch.Tensor) -> torch.Tensor:
    """The token each decoder position predicts: (B*T,), -100 where it predicts none.

    `labels` (B, T) hold the decoder input ids ([DEC] first) with padding set to -100; position t predicts
    labels[:, t + 1], the last position nothing. Every position keeps its row (a fixed shape: selecting the
    labelled ones would make the shape depend on the data, a host sync on a GPU); the loss ignores -100, as the
    reference's LM head does.
    """
    return F.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)


def itg_loss(lm_logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """Caption generation loss: mean label-smoothed CE of (B*T, V) logits over the positions whose `itg_targets`
    is not -100."""
    return F.cross_entropy(at_least_float32(lm_logits), targets, ignore_index=-100, label_smoothing=label_smoothing)


class Objectives:
    """The objectives' arithmetic a stage-1 step calls through its model (`model.objectives`): plain functions
    of tensors, no parameter of a module, so model/compile.py can give a model compiled ones (the hard
    negatives are drawn eagerly: the same random numbers with and without compilation)."""

    itc = staticmethod(itc_objective)
    itm_loss = staticmethod(itm_loss)
    itg_loss = staticmethod(itg_loss)
