"""The frozen LLM: any AutoModelForCausalLM directory (decoder) or a T5 directory, in its storage dtype.

With `model.llm.path` transformers reads the directory (its own key conventions, sharding, tied
weights) directly in the target dtype; missing, unexpected or mismatched keys are one UserError here
rather than transformers' "newly initialized" warning. Without a path a random OPT or T5 of the
configured sizes is allocated directly in that dtype (seeded by the caller).
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn

from blip2_ray.errors import UserError
from blip2_ray.model.checkpoint_files import default_dtype, require_local_dir
from blip2_ray.model.config import ModelConfig, llm_is_decoder
from blip2_ray.model.vision import DTYPES
from blip2_ray.model.weight_sources import llm_config_at

DeviceMap = dict[str, "str | int | torch.device"]


def padded_vocab(n: int) -> int:
    """Room for `<image>` (added by Blip2Processor) rounded up to a multiple of 8, as real checkpoints have."""
    return (n + 1 + 7) // 8 * 8


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' load report is replaced by our own error; keep its warnings out of the log."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def strict_from_pretrained(cls, path: str, what: str, **kwargs):
    """`cls.from_pretrained(path, **kwargs)`, local files only; any key that does not fit is a UserError."""
    with _quiet_transformers():
        try:
            model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{what} {path!r} does not load as {cls.__name__} "
                            f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None
    problems = [(name, sorted(str(k) for k in info.get(name) or []))
                for name in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")]
    problems = [(name, keys) for name, keys in problems if keys]
    if problems:
        detail = "; ".join(f"{name.replace('_', ' ')}: {', '.join(keys[:4])}" for name, keys in problems)
        raise UserError(f"{what} {path!r} does not fit {cls.__name__} ({detail})")
    return model


def load_language_model(path: str, kind: str, dtype: torch.dtype, what: str = "model.llm.path") -> nn.Module:
    """The LLM of an HF directory in `dtype` (decoder: AutoModelForCausalLM, t5: AutoModelForSeq2SeqLM)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    llm_config_at(path, kind, what)
    cls = AutoModelForCausalLM if llm_is_decoder(kind) else AutoModelForSeq2SeqLM
    return strict_from_pretrained(cls, require_local_dir(path, what), what, dtype=dtype)


def build_language_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    """The frozen LLM: from `llm.path`, else a random OPT (decoder) / T5 of the configured sizes.

    Allocated directly in `llm.dtype` (not yet frozen).
    """
    from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

    llm = cfg.llm
    dtype = DTYPES[llm.dtype]
    if llm.path:
        return load_language_model(llm.path, llm.kind, dtype)
    with default_dtype(dtype):
        if llm_is_decoder(llm.kind):
            return OPTForCausalLM(
                OPTConfig(
                    vocab_size=vocab_size, hidden_size=llm.hidden_size, num_hidden_layers=llm.num_layers,
                    num_attention_heads=llm.num_heads, ffn_dim=llm.ffn_size, max_position_embeddings=llm.max_positions,
                    word_embed_proj_dim=llm.hidden_size, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                    dropout=0.1, attention_dropout=0.0,
                )
            )
        return T5ForConditionalGeneration(
            T5Config(
                vocab_size=vocab_size, d_model=llm.hidden_size, d_kv=llm.head_dim, d_ff=llm.ffn_size,
                num_layers=llm.num_layers, num_decoder_layers=llm.num_layers, num_heads=llm.num_heads,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0,
            )
        )


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
