"""The frozen LLM's weights: any AutoModelForCausalLM directory (decoder) or a T5 directory, in its storage dtype.

With `model.llm.path` transformers reads the directory (its own key conventions, sharding, tied
weights) directly in the target dtype; missing, unexpected or mismatched keys are one UserError here
rather than transformers' "newly initialized" warning. Without a path a random OPT or T5 of the
configured sizes (model/language_model.py) is allocated directly in that dtype (seeded by the caller).
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from torch import nn

from blip2_ray.errors import UserError
from blip2_ray.model.config import ModelConfig, llm_is_decoder
from blip2_ray.model.language_model import llm_class, random_llm_config
from blip2_ray.model.partitioned import FrozenConstruction, construction_context, default_dtype
from blip2_ray.model.vision import DTYPES
from blip2_ray.weights.checkpoint_files import LazyTensors, TensorFiles, assign_weights
from blip2_ray.weights.llm_source import llm_config_at
from blip2_ray.weights.local_files import require_local_dir


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


def build_language_model(cfg: ModelConfig, vocab_size: int,
                         construction: FrozenConstruction | None = None) -> nn.Module:
    """The frozen LLM: from `llm.path`, else a random OPT (decoder) / T5 of the configured sizes.

    Allocated directly in `llm.dtype` (not yet frozen). `construction` (ZeRO-3, model/partitioned.py):
    built partitioned, `llm.path`'s tensors read into each rank's slices (load_language_model_partitioned).
    """
    llm = cfg.llm
    dtype = DTYPES[llm.dtype]
    if llm.path and construction is None:
        return load_language_model(llm.path, llm.kind, dtype)
    config = random_llm_config(cfg, vocab_size) if not llm.path else _llm_config_at(llm.path, llm.kind)
    with default_dtype(dtype), construction_context(construction):
        model = llm_class(llm.kind, dtype if llm.path else None)(config)
    if construction is not None:
        construction.finish(model, not llm.path)
    if llm.path:
        load_language_model_partitioned(model, llm.path)
    return model


def _llm_config_at(path: str, kind: str):
    from transformers import AutoConfig

    llm_config_at(path, kind)
    return AutoConfig.from_pretrained(require_local_dir(path, "model.llm.path"), local_files_only=True)


def load_language_model_partitioned(model: nn.Module, path: str, what: str = "model.llm.path") -> None:
    """Read an HF LLM directory's tensors into `model`'s partitioned parameters, one tensor at a time.

    Keys as the directory stores them, or without the base model prefix (facebook/opt-* files store
    `decoder.*` for `model.decoder.*`). Tied weights (the LM head of OPT) may be absent; any other key
    that does not fit is a UserError (weights/checkpoint_files.assign_weights).
    """
    files = TensorFiles(require_local_dir(path, what))
    own = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "") + "."

    def target(key: str) -> str:
        return key if key in own or prefix + key not in own else prefix + key

    state = LazyTensors({target(k): partial(files.get, k, own[target(k)].dtype if target(k) in own else None)
                         for k in files.keys()})
    # every parameter once (a tied LM head is the input embedding); buffers are computed, not read
    assign_weights(model, state, f"{what} {path!r}", required=[n for n, _ in model.named_parameters()])
