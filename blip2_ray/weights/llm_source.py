"""The LLM's weights source: its directory's config.json checked to be the kind the config names (`llm_config_at`),
and its model_type, which decides the caption-end convention (`llm_family`)."""

from __future__ import annotations

from pathlib import Path

from blip2_ray.errors import UserError
from blip2_ray.model.config import ModelConfig, llm_is_decoder
from blip2_ray.weights.export_kinds import BLIP2_MODEL_TYPES
from blip2_ray.weights.local_files import read_json, require_local_dir


def llm_config_at(path: str, kind: str, key: str = "model.llm.path") -> dict:
    """config.json of an LLM directory, checked to be a causal LM (decoder) or a seq2seq LM (t5)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    require_local_dir(path, key)
    if not (Path(path) / "config.json").is_file():
        raise UserError(f"{key} {path!r} holds no config.json; expected an HF LLM directory")
    data = read_json(Path(path) / "config.json", f"{key} config")
    model_type = data.get("model_type")
    if model_type in BLIP2_MODEL_TYPES:
        raise UserError(f"{key} {path!r} is a whole BLIP-2 model; load it with model.hf_path instead")
    decoder = llm_is_decoder(kind)
    names = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if decoder else MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
    if model_type not in names:
        want = "a decoder-only LLM (AutoModelForCausalLM)" if decoder else "an encoder-decoder LLM such as FlanT5"
        raise UserError(f"{key} {path!r} holds a {model_type!r} model; model.llm.kind {kind!r} expects {want}")
    return data


def llm_family(cfg: ModelConfig) -> str:
    """The LLM's model_type ("opt", "llama", "qwen2", "t5", ...): it decides the caption-end convention."""
    if cfg.hf_path:
        return read_json(Path(cfg.hf_path) / "config.json", "model.hf_path config").get("text_config", {}).get(
            "model_type", "opt")
    if cfg.llm.path:
        return llm_config_at(cfg.llm.path, cfg.llm.kind).get("model_type", "opt")
    return "opt" if llm_is_decoder(cfg.llm.kind) else "t5"  # random init builds an OPT or a T5
