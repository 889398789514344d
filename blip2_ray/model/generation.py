"""Step-wise generation for `Blip2Stage2`: the prompt pass (`prefill`) and the choice of each next token.

`Blip2Stage2.generate` (HF `generate`) runs a batch to its end in one call. A server wants more: each
token as soon as it exists, rows joining a running batch at a step boundary (continuous batching) and
leaving it when they finish or their client goes away, and a decode step whose shapes never change so
that it can be compiled and captured. `model.decode_slots.DecodeSlots` gives that: the KV cache of `rows`
slots x `length` positions is allocated once; a row's prompt pass (`prefill`, eager, any length) is copied into a free
slot; each decode step feeds every running row's last token at that row's own position, with a static
attention mask over the whole slot. Decoder-only LLMs (OPT, Llama, Qwen2, ...) and T5 (encoder-decoder).
Greedy decoding makes the same forward calls as HF `generate` and applies `min_new_tokens` as HF does, so
its tokens are the ones `Blip2Stage2.generate` returns (tests compare).

Within a slot, a decoder row holds [queries, prompt] from position 0 (a prompt shorter than its prefill
group's longest is left padded, mask 0) then its generated tokens; its position ids are the mask's running
count (as HF `generate` derives them: rotary LLMs would otherwise count the padding). A T5 row holds its
decoder tokens from position 0; its encoder output's cross-attention keys/values sit beside them.

The prompt helpers (`pad_prompts`, `tokenize_prompts`, `tokenize_questions`, `generate_text`) are in
`model.prompts`, the stop tokens in `model.caption_end`: the one definition that `Blip2Stage2.generate`'s
callers and the serving engine share.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

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


# ------------------------------------------------------------------------------------------------ the model
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


def cache_argument(lm) -> str:
    """The keyword the LLM's forward takes its KV cache by: `cache` (transformers 5.2x) or `past_key_values`
    (earlier 5.x, e.g. 5.17 on the GPU machines)."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


@dataclass
class Prefilled:
    """g rows after their prompt pass. cache: the LLM's KV cache of the pass (T5: self-attention of the decoder
    start token + cross-attention of the encoder output); mask (g, P): 1 where the pass saw a real position
    (decoder: queries + prompt, left padded; T5: the encoder's input)."""

    cache: DynamicCache | EncoderDecoderCache
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.mask.shape[0]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """A decoder's position ids (B, T) of left-padded rows, as HF `generate` derives them (padding: 0)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@torch.no_grad()
def prefill(model: Blip2Stage2, pixel_values: torch.Tensor, input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, question_ids: torch.Tensor | None = None,
            question_mask: torch.Tensor | None = None) -> tuple[Prefilled, torch.Tensor]:
    """Images (B, 3, H, W) + prompts (+ the Q-Former's question tokens) -> the rows' prompt pass and the
    float32 logits (B, V) of their first new token."""
    embeds, mask = model.llm_inputs(pixel_values, input_ids, attention_mask, question_ids, question_mask)
    lm = model.language_model
    cache_kw = cache_argument(lm)
    if decoder_only(model):
        # the last position by index, not `logits_to_keep=1`: that slice keeps the sequence stride, and on
        # CPU a bf16 lm_head on such a view copies the whole (V, D) weight first (3 s at OPT-2.7B width)
        last = torch.tensor([embeds.shape[1] - 1], device=embeds.device)
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), use_cache=True,
                 logits_to_keep=last)
        return Prefilled(_returned_cache(out), mask), out.logits[:, -1].float()
    b = embeds.shape[0]
    encoder_out = lm.get_encoder()(inputs_embeds=embeds, attention_mask=mask, return_dict=True)
    start = torch.full((b, 1), lm.config.decoder_start_token_id, dtype=torch.long, device=embeds.device)
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    out = lm(encoder_outputs=encoder_out, attention_mask=mask, decoder_input_ids=start, use_cache=True,
             **{cache_kw: cache})
    return Prefilled(_returned_cache(out), mask), out.logits[:, -1].float()


# ------------------------------------------------------------------------------------------------ choosing
def next_tokens(logits: torch.Tensor, n_generated: torch.Tensor, min_new_tokens: torch.Tensor,
                eos_ids: list[int], temperature: torch.Tensor | None = None, top_k: int = 50, top_p: float = 1.0,
                generator: torch.Generator | list[torch.Generator | None] | None = None) -> torch.Tensor:
    """The next token of each row (B,) from float32 logits (B, V).

    Rows that have generated fewer than their `min_new_tokens` cannot end (EOS scores -inf, as HF's
    MinNewTokensLengthLogitsProcessor). temperature (B,): 0 = greedy (argmax); > 0 = sampling after
    temperature, top-k and top-p, in HF's order, drawn with `generator`: one for the batch, or one per row
    (a row's draws then depend on its own seed only, not on the other rows of the batch).
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
    probs = F.softmax(s, -1)
    if isinstance(generator, (list, tuple)):
        sampled = torch.cat([torch.multinomial(probs[i], 1, generator=generator[r])
                             for i, r in enumerate(rows.tolist())])
    else:
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return tokens.index_copy(0, rows, sampled)
