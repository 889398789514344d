"""The KV-cache layers of `model.decode_slots.DecodeSlots`: one attention layer's keys/values for every slot,
written at each row's own position, and T5's per-row relative position bias."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import EncoderDecoderCache, StaticLayer

if TYPE_CHECKING:
    from blip2_ray.model.decode_slots import DecodeSlots


# ------------------------------------------------------------------------------------------------ static slots
class SlotLayer(StaticLayer):
    """One attention layer's keys/values for every slot: (rows, heads, length, head_dim), allocated once.

    Self-attention: a decode step writes each row's new key/value at that row's own position
    (`slots.write_pos`; transformers' StaticLayer writes one position shared by the batch, but rows that
    joined at different steps have different lengths) and returns the first n slots whole; the static
    attention mask hides what is not the row's. Cross-attention (T5): holds the encoder's keys/values written
    at prefill, returned as they are."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, slots: DecodeSlots, writes: bool):
        super().__init__(max_cache_len=keys.shape[2])
        self.full_keys, self.full_values = keys, values
        self.keys, self.values = keys, values
        self.slots, self.writes = slots, writes
        self.device = keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.is_initialized = True
        torch._dynamo.mark_static_address(keys)
        torch._dynamo.mark_static_address(values)

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated in __init__
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[0]
        keys, values = self.full_keys[:n], self.full_values[:n]
        if self.writes:
            where = self.slots.write_pos[:n].to(keys.device).view(n, 1, 1, 1)
            keys.scatter_(2, where.expand(key_states.shape), key_states.to(keys.dtype))
            values.scatter_(2, where.expand(value_states.shape), value_states.to(values.dtype))
        return keys, values

    def get_seq_length(self):
        # T5 derives its relative position bias from this: each row's own position (n, 1), read by the
        # per-row bias `per_row_position_bias` installs; decoders take positions from position_ids
        if not self.slots.decoder and self.writes:
            return self.slots.position[: self.slots.n, None]
        return 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0


class NoShortcutEncoderDecoderCache(EncoderDecoderCache):
    """T5's cache of the slots: transformers' "cross-attention already computed" shortcut reads a layer's
    `.keys` whole (every slot); here cross-attention always goes through `SlotLayer.update`, which returns
    the first n slots."""

    @property
    def is_updated(self) -> dict:
        return {}

    @is_updated.setter
    def is_updated(self, value) -> None:
        pass


def per_row_position_bias(lm) -> None:
    """Let T5's decoder compute its relative position bias per row: `compute_bias` given a (B, 1) tensor of
    positions (what `SlotLayer.get_seq_length` returns) gives (B, heads, q, k); any other call is unchanged."""
    attn = lm.decoder.block[0].layer[0].SelfAttention
    if getattr(attn, "_per_row_bias", False):
        return
    original = attn.compute_bias

    def compute_bias(query_length, key_length, device=None, past_seen_tokens=0, **kwargs):
        if not (torch.is_tensor(past_seen_tokens) and past_seen_tokens.dim() == 2):
            return original(query_length, key_length, device, past_seen_tokens=past_seen_tokens, **kwargs)
        device = device if device is not None else attn.relative_attention_bias.weight.device
        context = torch.arange(query_length, device=device)[None, :, None] + past_seen_tokens.to(device)[:, :, None]
        memory = torch.arange(key_length, device=device)[None, None, :]
        bucket = attn._relative_position_bucket(memory - context, bidirectional=not attn.is_decoder,
                                                num_buckets=attn.relative_attention_num_buckets,
                                                max_distance=attn.relative_attention_max_distance)
        return attn.relative_attention_bias(bucket).permute(0, 3, 1, 2)  # (B, heads, q, k)

    attn.compute_bias = compute_bias
    attn._per_row_bias = True
