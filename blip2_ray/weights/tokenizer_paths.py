"""Which tokenizer directory a ModelConfig means, resolved in one place (and loaded through tokenizers.py).

`qformer.tokenizer` / `llm.tokenizer` name a local directory or "tiny" (built offline). For the LLM,
"tiny" with an `llm.path` (or an `hf_path`) means the tokenizer saved in that model's directory.
The data pipeline receives these directories and loads them with the same loaders (cached per process).
"""

from __future__ import annotations

from blip2_ray.model.config import ModelConfig, llm_is_decoder
from blip2_ray.weights.local_files import require_local_dir
from blip2_ray.weights.tiny_tokenizers import build_tiny_tokenizers, default_tiny_tokenizer_dir
from blip2_ray.weights.tokenizers import load_llm_tokenizer, load_qformer_tokenizer


def resolve_tokenizer_dir(value: str, kind: str) -> str:
    """'tiny' -> the offline-built tiny tokenizer of `kind` ("qformer", "opt", "t5", ...); else a local dir."""
    if value == "tiny":
        return build_tiny_tokenizers(default_tiny_tokenizer_dir())[kind]
    return require_local_dir(value, f"{kind} tokenizer")


def qformer_tokenizer_dir(cfg: ModelConfig) -> str:
    return resolve_tokenizer_dir(cfg.qformer.tokenizer, "qformer")


def llm_tokenizer_dir(cfg: ModelConfig) -> str:
    llm = cfg.llm
    if llm.tokenizer == "tiny" and (llm.path or cfg.hf_path):
        return require_local_dir(cfg.hf_path or llm.path, "LLM tokenizer")
    return resolve_tokenizer_dir(llm.tokenizer, "opt" if llm_is_decoder(llm.kind) else "t5")


def qformer_tokenizer(cfg: ModelConfig):
    """The Q-Former tokenizer of `cfg` (BERT + [DEC])."""
    return load_qformer_tokenizer(qformer_tokenizer_dir(cfg))


def llm_tokenizer(cfg: ModelConfig):
    """The LLM tokenizer of `cfg` (a pad token set when the family ships none)."""
    return load_llm_tokenizer(llm_tokenizer_dir(cfg))
