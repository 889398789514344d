"""The frozen LLM's network: the class and config of a random OPT / T5 of the configured sizes, the vocabulary
size of a tokenizer's model, and placing the LLM's submodules on devices. Reading an LLM directory (and
building the LLM of a config, from its path or at random) is weights/language_model.py's.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from blip2_ray.errors import UserError
from blip2_ray.model.config import ModelConfig, llm_is_decoder

DeviceMap = dict[str, "str | int | torch.device"]


def padded_vocab(n: int) -> int:
    """Room for `<image>` (added by Blip2Processor) rounded up to a multiple of 8, as real checkpoints have."""
    return (n + 1 + 7) // 8 * 8


def random_llm_config(cfg: ModelConfig, vocab_size: int):
    """The transformers config of a random OPT (decoder) / T5 of `cfg.llm`'s sizes with `vocab_size` rows."""
    from transformers import OPTConfig, T5Config

    llm = cfg.llm
    if llm_is_decoder(llm.kind):
        return OPTConfig(
            vocab_size=vocab_size, hidden_size=llm.hidden_size, num_hidden_layers=llm.num_layers,
            num_attention_heads=llm.num_heads, ffn_dim=llm.ffn_size, max_position_embeddings=llm.max_positions,
            word_embed_proj_dim=llm.hidden_size, pad_token_id=1, bos_token_id=2, eos_token_id=2,
            dropout=0.1, attention_dropout=0.0,
        )
    return T5Config(
        vocab_size=vocab_size, d_model=llm.hidden_size, d_kv=llm.head_dim, d_ff=llm.ffn_size,
        num_layers=llm.num_layers, num_decoder_layers=llm.num_layers, num_heads=llm.num_heads,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )


def llm_class(kind: str, from_path_dtype: torch.dtype | None):
    """The class a random LLM is built as (OPT / T5), or (a dtype given) the Auto class of a directory's
    config, built in that dtype (transformers would take the dtype config.json names)."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        OPTForCausalLM,
        T5ForConditionalGeneration,
    )

    if from_path_dtype is not None:
        auto = AutoModelForCausalLM if llm_is_decoder(kind) else AutoModelForSeq2SeqLM
        return partial(auto.from_config, dtype=from_path_dtype)
    return OPTForCausalLM if llm_is_decoder(kind) else T5ForConditionalGeneration


def _to_device(device: torch.device, value):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(device, v) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(device, v) for k, v in value.items()}
    return value


def _inputs_to(device: torch.device, module, args, kwargs):
    return _to_device(device, args), _to_device(device, kwargs)


def _output_to(device: torch.device, module, args, kwargs, output):
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        output.logits = output.logits.to(device)
    return output


def place_language_model(model: nn.Module, device_map: DeviceMap) -> None:
    """Spread the LLM's submodules over devices: {"module.name": device} ("" names the whole model).

    Each mapped submodule's inputs move to its device before it runs, and the logits come back to the
    device of the input embeddings (where generation keeps its tokens). Tied weights must map to one
    device. Every parameter must be covered by some entry.
    """
    names = sorted(device_map, key=len)  # parents first, so a child's entry wins
    for name in names:
        module = model.get_submodule(name) if name else model
        device = torch.device(device_map[name])
        module.to(device)
        module.register_forward_pre_hook(partial(_inputs_to, device), with_kwargs=True)
    covered = [n for n, _ in model.named_parameters() if any(n == k or n.startswith(k + ".") or not k for k in names)]
    left = [n for n, _ in model.named_parameters() if n not in set(covered)]
    if left:
        raise UserError(f"device_map {device_map} places no device for {left[:3]}")
    first = model.get_input_embeddings().weight.device
    model.register_forward_hook(partial(_output_to, first), with_kwargs=True)
