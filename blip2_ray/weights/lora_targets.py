"""The LoRA targets of a configured LLM, checked on the driver before Ray starts: the LLM's module names from its
config alone (built on the meta device; a local directory's config.json is read, no weights)."""

from __future__ import annotations

import torch
from torch import nn

from blip2_ray.model.llm_lora import resolve_targets


def llm_skeleton(model_cfg) -> nn.Module:
    """The LLM a ModelConfig builds, on the meta device (no weights read): its module names and config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from blip2_ray.model.config import llm_is_decoder
    from blip2_ray.model.language_model import random_llm_config
    from blip2_ray.weights.language_model import _llm_config_at

    if model_cfg.hf_path:
        config = AutoConfig.from_pretrained(model_cfg.hf_path, local_files_only=True).text_config
    elif model_cfg.llm.path:
        config = _llm_config_at(model_cfg.llm.path, model_cfg.llm.kind)
    else:
        config = random_llm_config(model_cfg, 64)
    decoder = not getattr(config, "is_encoder_decoder", not llm_is_decoder(model_cfg.llm.kind))
    with torch.device("meta"):
        return (AutoModelForCausalLM if decoder else AutoModelForSeq2SeqLM).from_config(config)


def check_lora_targets(model_cfg, target_modules: list[str] | None) -> list[str]:
    """The driver's check before Ray starts: the targets exist in the configured LLM (UserError naming the
    modules it has); returns them (None: peft's default for the family)."""
    return resolve_targets(llm_skeleton(model_cfg), target_modules)
