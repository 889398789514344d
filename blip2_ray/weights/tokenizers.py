"""Tokenizers: loaded from local HF-format directories, and the caption conventions of each LLM family.

Real users point `model.qformer.tokenizer` / `model.llm.path` at local copies of bert-base-uncased and
of their LLM; the value "tiny" names the tokenizers built offline (weights/tiny_tokenizers.py). What ends a
caption and whether a BOS leads are decided here: the data pipeline and the model both read them.
"""

from __future__ import annotations

import json
from pathlib import Path

from blip2_ray.errors import UserError
from blip2_ray.weights.checkpoint_files import require_local_dir

DEC_TOKEN = "[DEC]"


def load_tokenizer(path: str, what: str = "tokenizer"):
    """Load an HF tokenizer from a local directory; a hub id or a missing path is one clear error."""
    from transformers import AutoTokenizer

    p = Path(require_local_dir(path, what))
    kwargs = {}
    if _is_native_export(p):
        from transformers import PretrainedConfig

        kwargs["config"] = PretrainedConfig()  # our own export format: transformers knows no config class for it
    try:
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True, **kwargs)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{what} directory {path!r} holds no readable tokenizer ({e.__class__.__name__})") from None


def _is_native_export(d: Path) -> bool:
    from blip2_ray.weights.export_kinds import NATIVE_MODEL_TYPE

    try:
        return json.loads((d / "config.json").read_text()).get("model_type") == NATIVE_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_qformer_tokenizer(path: str):
    """The Q-Former's BERT tokenizer with the `[DEC]` bos token BLIP-2 adds (added if missing)."""
    tok = load_tokenizer(path, "Q-Former tokenizer")
    if tok.bos_token != DEC_TOKEN:
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    return tok


def load_llm_tokenizer(path: str):
    """The LLM's tokenizer; one without a pad token (Llama) pads with its EOS (padding is masked anyway)."""
    tok = load_tokenizer(path, "LLM tokenizer")
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def prepends_bos(tok) -> bool:
    """True when the tokenizer starts every sequence with its BOS (OPT, Llama, Mistral; not GPT-2, Qwen2, T5)."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id
