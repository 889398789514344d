"""FlanT5's stage-2 training target: the prefix-LM split of a caption (encoder reads a random prefix, the decoder
is trained on the rest), which HF does not have."""

from __future__ import annotations

import torch


def prefix_lm_split(
    ids: torch.Tensor, mask: torch.Tensor, eos_id: int, pad_id: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split each caption at a random point k in [1, max(1, n // 2)] (n = caption tokens without </s>).

    ids (B, T) = [caption, </s>, pad...]. Returns encoder ids [caption[:k], </s>, pad...], its mask,
    and decoder labels [caption[k:], </s>, -100...] (the suffix is the target).
    """
    b, t = ids.shape
    n = (mask.sum(1) - 1).clamp(min=1)  # caption tokens without the final </s>
    hi = (n // 2).clamp(min=1)
    u = torch.rand(b, generator=generator, device="cpu").to(ids.device)
    k = 1 + (u * hi).long().clamp(max=hi - 1)  # uniform over 1..hi
    pos = torch.arange(t, device=ids.device)[None]
    enc_ids = torch.where(pos < k[:, None], ids, torch.full_like(ids, pad_id))
    enc_ids = torch.where(pos == k[:, None], torch.full_like(ids, eos_id), enc_ids)
    enc_mask = (pos <= k[:, None]).long()
    src = (pos + k[:, None]).clamp(max=t - 1)
    labels = torch.gather(ids, 1, src)
    valid = (pos + k[:, None]) < mask.sum(1, keepdim=True)
    labels = labels.masked_fill(~valid, -100)
    return enc_ids, enc_mask, labels
