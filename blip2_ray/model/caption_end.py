"""Where a caption ends, in an LLM tokenizer's tokens: what training appends to a caption (`caption_end_ids`) and
what stops generation (`caption_stop_ids`). Functions of a loaded tokenizer (no weights, no torch): the data
pipeline, the training tasks, `Blip2Stage2.generate`'s callers and the serving engine share them."""

from __future__ import annotations


def appends_eos(tok) -> bool:
    """True when the tokenizer ends every sequence with its EOS by itself (T5)."""
    ids = tok("a")["input_ids"]
    return tok.eos_token_id is not None and bool(ids) and ids[-1] == tok.eos_token_id


def caption_end_ids(tok, llm_family: str | None) -> list[int]:
    """Token ids appended to a training caption so the LLM learns where captions end.

    OPT: "\\n" (how BLIP-2 trained OPT; its generation stops at "\\n"). A tokenizer that appends its EOS
    itself (T5): nothing. Every other family: the tokenizer's EOS token.
    """
    if llm_family == "opt":
        return tok("\n", add_special_tokens=False)["input_ids"]
    if appends_eos(tok) or tok.eos_token_id is None:
        return []
    return [tok.eos_token_id]


def caption_stop_ids(tok, llm_family: str | None) -> list[int]:
    """Token ids that end a generated caption: how training ends a caption (`caption_end_ids`: "\\n" for OPT)
    and the tokenizer's EOS. Generation stops at the first of them (Blip2Stage2.generate, the engine)."""
    ids = list(caption_end_ids(tok, llm_family))
    if len(ids) > 1:  # a multi-token end cannot stop a token-wise search: only the EOS does
        ids = []
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids
