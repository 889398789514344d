"""Step-wise generation for `Blip2Stage2`: prefill, one decode step at a time, rows that join and leave.

`Blip2Stage2.generate` (HF `generate`) runs a batch to its end in one call. A server wants more: each
token as soon as it exists, new rows joining a running batch at a step boundary (continuous batching)
and rows leaving it when they finish or their client goes away. These functions give that on top of
the LLM's own KV cache, for decoder-only LLMs (OPT, Llama, Qwen2, ...) and T5 (encoder-decoder). Greedy
decoding makes the same forward calls as HF `generate` and applies `min_new_tokens` as HF does, so its
tokens are the ones `Blip2Stage2.generate` returns (tests compare).

Rows of different lengths share one cache by LEFT padding (mask 0): a decoder's positions are the
attention mask's running count (passed as `position_ids`, as HF `generate` does: rotary LLMs would
otherwise count the padding), and T5's relative position bias depends only on the distance between two
positions, so padding never changes a row's result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from blip2_ray.model.stage2 import Blip2Stage2

# Generation-config fields that add a logits processor to HF's greedy or sampling decoding; the
# step-wise path does not apply them, so a model that sets one must use `Blip2Stage2.generate`.
_NEUTRAL = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "renormalize_logits": False, "min_length": 0, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None, "guidance_scale": None, "watermarking_config": None,
}


def unsupported_generation_settings(generation_config) -> list[str]:
    """Names of the LLM's generation-config fields that step-wise decoding would ignore (empty: none)."""
    out = []
    for name, neutral in _NEUTRAL.items():
        value = getattr(generation_config, name, neutral)
        if value not in (neutral, None) and not (isinstance(value, (list, tuple, dict)) and not value):
            out.append(name)
    return out


def decoder_only(model: Blip2Stage2) -> bool:
    """True for a decoder-only LLM (OPT, Llama, ...), False for an encoder-decoder one (T5)."""
    return not model.language_model.config.is_encoder_decoder


@dataclass
class DecodeBatch:
    """The state of B rows between decode steps.

    cache: the LLM's KV cache (T5: self-attention + cross-attention). mask (B, T): 1 where the cache holds
    a real position of the row (decoder: queries, prompt and generated tokens; T5: decoder tokens).
    encoder_hidden (B, S, D) / encoder_mask (B, S): T5's encoder output (None for a decoder). padded: some
    row has a 0 in `mask`.
    """

    cache: DynamicCache | EncoderDecoderCache
    mask: torch.Tensor
    encoder_hidden: torch.Tensor | None = None
    encoder_mask: torch.Tensor | None = None
    padded: bool = False

    def __len__(self) -> int:
        return self.mask.shape[0]


def prompt_embeddings(model: Blip2Stage2, pixel_values: torch.Tensor, input_ids: torch.Tensor | None,
                      attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM input `Blip2Stage2.generate` builds: (B, Q + P, D) [visual prompt, prompt embeddings] + its mask.

    Decoder: `input_ids` are LEFT-padded prompts as the tokenizer writes them (None: just the BOS when the
    model's tokenizer starts with one, else nothing). T5: encoder prompts (None: only the visual prompt).
    """
    prefix = model.visual_prompt(pixel_values)  # (B, Q, D)
    b, nq = prefix.shape[:2]
    dev = prefix.device
    emb = model.llm_embeddings()
    if input_ids is None:
        if model.starts_with_bos:
            input_ids = torch.full((b, 1), model.language_model.config.bos_token_id, dtype=torch.long, device=dev)
        else:
            input_ids = torch.zeros(b, 0, dtype=torch.long, device=dev)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    embeds = torch.cat([prefix.to(emb.weight.dtype), emb(input_ids)], 1)
    mask = torch.cat([torch.ones(b, nq, dtype=attention_mask.dtype, device=dev), attention_mask], 1)
    return embeds, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """A decoder's position ids (B, T) of left-padded rows, as HF `generate` derives them (padding: 0)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def prefill(model: Blip2Stage2, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None) -> tuple[DecodeBatch, torch.Tensor]:
    """Images (B, 3, H, W) + prompts -> the rows' state and the float32 logits (B, V) of their first new token."""
    embeds, mask = prompt_embeddings(model, pixel_values, input_ids, attention_mask)
    lm = model.language_model
    if decoder_only(model):
        # the last position by index, not `logits_to_keep=1`: that slice keeps the sequence stride, and on
        # CPU a bf16 lm_head on such a view copies the whole (V, D) weight first (3 s at OPT-2.7B width)
        last = torch.tensor([embeds.shape[1] - 1], device=embeds.device)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                 logits_to_keep=last)
        padded = bool((mask == 0).any())
        return DecodeBatch(out.cache, mask, padded=padded), out.logits[:, -1].float()
    b = embeds.shape[0]
    encoder_out = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
    start = torch.full((b, 1), lm.config.decoder_start_token_id, dtype=torch.long, device=embeds.device)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    out = lm(encoder_outputs=encoder_out, attention_mask=mask, decoder_input_ids=start, cache=cache, use_cache=True)
    decoder_mask = torch.ones(b, 1, dtype=mask.dtype, device=mask.device)
    return DecodeBatch(out.cache, decoder_mask, encoder_out.last_hidden_state, mask), out.logits[:, -1].float()


@torch.no_grad()
def decode_step(model: Blip2Stage2, batch: DecodeBatch, tokens: torch.Tensor) -> torch.Tensor:
    """Feed each row's last token (B,) and return the float32 logits (B, V) of the next one (updates `batch`)."""
    lm = model.language_model
    mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch), 1)], 1)
    ids = tokens.view(-1, 1)
    if decoder_only(model):
        position = batch.mask.sum(1, keepdim=True)  # the real positions before this one
        out = lm(input_ids=ids, attention_mask=mask, position_ids=position, cache=batch.cache, use_cache=True,
                 logits_to_keep=1)
    else:
        # HF passes no decoder mask; an all-ones one would take another attention path (float noise)
        out = lm(encoder_outputs=BaseModelOutput(last_hidden_state=batch.encoder_hidden),
                 attention_mask=batch.encoder_mask, decoder_input_ids=ids,
                 decoder_attention_mask=mask if batch.padded else None, cache=batch.cache, use_cache=True)
    batch.cache, batch.mask = out.cache, mask
    return out.logits[:, -1].float()


def _self_layers(cache) -> list:
    return (cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache).layers


def _cross_layers(cache) -> list:
    return cache.cross_attention_cache.layers if isinstance(cache, EncoderDecoderCache) else []


def _rebuild(self_kv: list, cross_kv: list, encoder: bool):
    self_cache = DynamicCache(ddp_cache_data=self_kv)
    return EncoderDecoderCache(self_cache, DynamicCache(ddp_cache_data=cross_kv)) if encoder else self_cache


@torch.no_grad()
def select_rows(batch: DecodeBatch, keep: list[int]) -> DecodeBatch:
    """Only the rows `keep` (in that order); cache columns no kept row uses are dropped."""
    idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    at = lambda t: idx.to(t.device)  # noqa: E731  (a device_map puts each layer's cache on its own device)
    mask = batch.mask[idx]
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]  # left padding all kept rows share
    mask = mask[:, start:]
    self_kv = [(layer.keys[at(layer.keys), :, start:], layer.values[at(layer.values), :, start:])
               for layer in _self_layers(batch.cache)]
    encoder = batch.encoder_hidden is not None
    cross_kv = [(layer.keys[at(layer.keys)], layer.values[at(layer.values)]) for layer in _cross_layers(batch.cache)]
    return DecodeBatch(
        _rebuild(self_kv, cross_kv, encoder), mask,
        batch.encoder_hidden[at(batch.encoder_hidden)] if encoder else None,
        batch.encoder_mask[at(batch.encoder_mask)] if encoder else None,
        padded=bool((mask == 0).any()),
    )


def _pad(x: torch.Tensor, length: int, dim: int, left: bool) -> torch.Tensor:
    extra = length - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    zeros = x.new_zeros(shape)
    return torch.cat([zeros, x] if left else [x, zeros], dim)


def _concat_layers(layers_a, layers_b, length: int, left: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (keys, values) of `layers_a`'s rows then `layers_b`'s, each padded to `length` positions."""
    return [tuple(torch.cat([_pad(x, length, -2, left), _pad(y, length, -2, left)], 0)
                  for x, y in ((la.keys, lb.keys), (la.values, lb.values)))
            for la, lb in zip(layers_a, layers_b)]


@torch.no_grad()
def concat_batches(a: DecodeBatch, b: DecodeBatch) -> DecodeBatch:
    """The rows of `a` then those of `b` in one batch (the shorter one's cache left padded)."""
    t = max(a.mask.shape[1], b.mask.shape[1])
    self_kv = _concat_layers(_self_layers(a.cache), _self_layers(b.cache), t, left=True)
    mask = torch.cat([_pad(a.mask, t, 1, True), _pad(b.mask, t, 1, True)], 0)
    encoder = a.encoder_hidden is not None
    cross_kv, hidden, enc_mask = [], None, None
    if encoder:  # encoder outputs of different lengths: pad on the right, masked
        s = max(a.encoder_mask.shape[1], b.encoder_mask.shape[1])
        cross_kv = _concat_layers(_cross_layers(a.cache), _cross_layers(b.cache), s, left=False)
        hidden = torch.cat([_pad(a.encoder_hidden, s, 1, False), _pad(b.encoder_hidden, s, 1, False)], 0)
        enc_mask = torch.cat([_pad(a.encoder_mask, s, 1, False), _pad(b.encoder_mask, s, 1, False)], 0)
    return DecodeBatch(_rebuild(self_kv, cross_kv, encoder), mask, hidden, enc_mask, padded=bool((mask == 0).any()))


def next_tokens(logits: torch.Tensor, n_generated: torch.Tensor, min_new_tokens: torch.Tensor,
                eos_ids: list[int], temperature: torch.Tensor | None = None, top_k: int = 50, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The next token of each row (B,) from float32 logits (B, V).

    Rows that have generated fewer than their `min_new_tokens` cannot end (EOS scores -inf, as HF's
    MinNewTokensLengthLogitsProcessor). temperature (B,): 0 = greedy (argmax); > 0 = sampling after
    temperature, top-k and top-p, in HF's order.
    """
    scores = logits
    block = n_generated < min_new_tokens
    if bool(block.any()):
        eos = torch.tensor(eos_ids, device=logits.device)
        scores = scores.clone()
        scores[:, eos] = torch.where(block[:, None], -math.inf, scores[:, eos])
    tokens = scores.argmax(-1)
    if temperature is None or not bool((temperature > 0).any()):
        return tokens
    rows = (temperature > 0).nonzero().squeeze(1)
    s = scores[rows] / temperature[rows, None]
    if 0 < top_k < s.shape[-1]:
        kth = torch.topk(s, top_k).values[:, -1:]
        s = s.masked_fill(s < kth, -math.inf)
    if top_p < 1.0:
        sorted_s, order = torch.sort(s, descending=False)
        cum = sorted_s.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[:, -1] = False  # keep at least one token
        s = s.masked_fill(drop.scatter(1, order, drop), -math.inf)
    sampled = torch.multinomial(F.softmax(s, -1), 1, generator=generator).squeeze(1)
    return tokens.index_copy(0, rows, sampled)
