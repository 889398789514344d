"""Held-out checks of a trained model: image->text retrieval R@1 (stage 1), caption accuracy (stage 2).

Plain PyTorch on one process; batches are the data pipeline's rows (pixel_values, token ids, caption).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def retrieval_recall_at_1(model, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, labels: list) -> tuple[float, float]:
    """(R@1, chance) of image->text retrieval by ITC similarity over the given set.

    `labels[i]` names what item i shows (the caption itself, or e.g. (colour, shape) when several
    phrasings describe one content): a hit is retrieving any text with the image's label. Chance: the
    expected R@1 of a random pick among the texts.
    """
    captions = labels
    model.eval()
    image_feats = model.image_feats(model.encode_image(pixel_values))  # (N, Q, E)
    text_feat = model.text_feat(input_ids, attention_mask)  # (N, E)
    sim = torch.einsum("iqe,te->itq", image_feats, text_feat).amax(-1)  # (N, N)
    best = sim.argmax(1).tolist()
    hits = sum(captions[j] == captions[i] for i, j in enumerate(best))
    chance = sum(sum(c == ci for c in captions) for ci in captions) / len(captions) ** 2
    return hits / len(captions), chance


def caption_names_object(caption: str, colour: str, shape: str) -> bool:
    """True when a generated caption names the true colour and shape."""
    words = caption.lower().split()
    return colour in words and shape in words
