"""The prompt helpers every caller of `Blip2Stage2.generate` and the serving engine share: prompts padded
(left for decoder LLMs, right for T5 and the Q-Former), tokenised, questions for a question-aware Q-Former,
and `generate_text` (captions or answers as strings)."""

from __future__ import annotations

import torch

from blip2_ray.model.caption_end import caption_stop_ids
from blip2_ray.model.stage2 import Blip2Stage2, llm_kind_of


# ------------------------------------------------------------------------------------------------ prompts
def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def pad_prompts(prompts: list[list[int]], pad_id: int, left: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, P) ids and mask, padded on the left (decoder prompts) or the right (T5, Q-Former)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            sl = slice(width - len(p), width) if left else slice(0, len(p))
            ids[i, sl] = torch.tensor(p, dtype=torch.long)
            mask[i, sl] = 1
    return ids.to(device), mask.to(device)


def tokenize_prompts(tokenizer, prompts: list[str] | None, batch: int, llm_kind: str, device=None):
    """Prompts -> (input_ids, attention_mask) for `Blip2Stage2.generate` / `prefill`, or (None, None) without
    prompts: each prompt tokenised once with the tokenizer's own BOS handling, padded by `pad_prompts`
    (decoders on the left, T5 on the right)."""
    if not prompts or all(not p for p in prompts):
        return None, None
    if len(prompts) == 1 and batch > 1:
        prompts = prompts * batch
    ids = [tokenizer(p).input_ids for p in prompts]
    return pad_prompts(ids, pad_id_of(tokenizer), llm_kind_of(llm_kind) == "decoder", device)


def question_tokens(qformer_tokenizer, text: str, max_len: int) -> list[int]:
    """The question-aware Q-Former's tokens of one prompt, as VQA training writes them ([CLS] ... [SEP],
    at most `max_len`; data/records.py tokenize_qformer)."""
    return qformer_tokenizer(text, truncation=True, max_length=max_len).input_ids


def tokenize_questions(qformer_tokenizer, prompts: list[str], max_len: int, device=None):
    """Prompts -> (question_ids, question_mask) for a question-aware Q-Former (right padded)."""
    ids = [question_tokens(qformer_tokenizer, p, max_len) for p in prompts]
    return pad_prompts(ids, pad_id_of(qformer_tokenizer), False, device)


def generate_text(
    model: Blip2Stage2,
    tokenizer,
    pixel_values: torch.Tensor,
    prompts: list[str] | None = None,
    qformer_tokenizer=None,
    question_max_len: int = 32,
    **generate_kwargs,
) -> list[str]:
    """Captions or answers as strings (prompts optional, one per image or one for all).

    A question-aware (VQA) model also reads each prompt in its Q-Former, tokenised by `qformer_tokenizer`
    as in training (at most `question_max_len` tokens)."""
    if prompts and len(prompts) == 1:
        prompts = prompts * pixel_values.shape[0]
    ids, mask = tokenize_prompts(tokenizer, prompts, pixel_values.shape[0], model.llm_kind, pixel_values.device)
    generate_kwargs.setdefault("eos_token_id", caption_stop_ids(tokenizer, model.llm_family))
    if model.takes_question and prompts:
        if qformer_tokenizer is None:
            raise ValueError("a question-aware model needs its Q-Former tokenizer to read the prompts")
        q_ids, q_mask = tokenize_questions(qformer_tokenizer, list(prompts), question_max_len, pixel_values.device)
        generate_kwargs.update(question_ids=q_ids, question_mask=q_mask)
    out = model.generate(pixel_values, ids, mask, **generate_kwargs)
    return [s.strip() for s in tokenizer.batch_decode(out, skip_special_tokens=True)]
