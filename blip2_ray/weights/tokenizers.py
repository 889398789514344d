"""Tokenizers: loaded from local HF-format directories, and the caption conventions of each LLM family.

Real users point `model.qformer.tokenizer` / `model.llm.path` at local copies of bert-base-uncased and
of their LLM; the value "tiny" names the tokenizers built offline (weights/tiny_tokenizers.py). What ends a
caption and whether a BOS leads are decided here: the data pipeline and the model both read them.
"""

from __future__ import annotations

import json
from pathlib import Path

from blip2_ray.errors import UserError
from blip2_ray.weights.local_files import require_local_dir

DEC_TOKEN = "[DEC]"


def load_tokenizer(path: str, what: str = "tokenizer", tokenizer_class: str | None = None):
    """Load an HF tokenizer from a local directory; a hub id or a missing path is one clear error.

    `tokenizer_class` (`tokenizer_class_name` of the same directory's tokenizer, loaded once elsewhere): load with
    that class, the one AutoTokenizer chose, without AutoTokenizer. AutoTokenizer reads the model's config, which
    imports torch (transformers 5: 5.2 CPU s against 1.6-2.3 s for the class alone on the 2-core machine); a data
    pipeline's decode task only tokenises, so it never needs torch.
    """
    p = Path(require_local_dir(path, what))
    try:
        if tokenizer_class is not None:
            return _transformers_class(tokenizer_class).from_pretrained(str(p), local_files_only=True)
        from transformers import AutoTokenizer

        kwargs = {}
        if _is_native_export(p):
            from transformers import PretrainedConfig

            kwargs["config"] = PretrainedConfig()  # our own export format: transformers knows no config class for it
        return AutoTokenizer.from_pretrained(str(p), local_files_only=True, **kwargs)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{what} directory {path!r} holds no readable tokenizer ({e.__class__.__name__})") from None


def tokenizer_class_name(tok) -> str:
    """`module:qualname` of a loaded tokenizer's class, for `load_tokenizer(..., tokenizer_class=)`."""
    cls = type(tok)
    return f"{cls.__module__}:{cls.__qualname__}"


def _transformers_class(name: str):
    import importlib

    module, _, qualname = name.partition(":")
    if not (module == "transformers" or module.startswith("transformers.")) or not qualname:
        raise ValueError(f"tokenizer class {name!r} is not a transformers class")
    return getattr(importlib.import_module(module), qualname)


def _is_native_export(d: Path) -> bool:
    from blip2_ray.weights.export_kinds import NATIVE_MODEL_TYPE

    try:
        return json.loads((d / "config.json").read_text()).get("model_type") == NATIVE_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def load_qformer_tokenizer(path: str, tokenizer_class: str | None = None):
    """The Q-Former's BERT tokenizer with the `[DEC]` bos token BLIP-2 adds (added if missing)."""
    tok = load_tokenizer(path, "Q-Former tokenizer", tokenizer_class)
    if tok.bos_token != DEC_TOKEN:
        tok.add_special_tokens({"bos_token": DEC_TOKEN})
    return tok


def load_llm_tokenizer(path: str, tokenizer_class: str | None = None):
    """The LLM's tokenizer; one without a pad token (Llama) pads with its EOS (padding is masked anyway)."""
    tok = load_tokenizer(path, "LLM tokenizer", tokenizer_class)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def prepends_bos(tok) -> bool:
    """True when the tokenizer starts every sequence with its BOS (OPT, Llama, Mistral; not GPT-2, Qwen2, T5)."""
    if tok.bos_token_id is None:
        return False
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id
