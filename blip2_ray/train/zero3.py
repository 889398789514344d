"""ZeRO-3 on the Train worker: the frozen ViT / LLM built partitioned, and their residency measured.

`frozen_construction(ds_config)` is what the builders take (model/partitioned.py): each frozen part is
constructed inside `deepspeed.zero.Init`, so every parameter is cut into world-size slices as soon as its
module exists (peak: the largest module whole, plus 1/world of the rest), and weight files are read into
each rank's slice (checkpoint_files.assign_weights). No dtype override: zero.Init would cast every new
floating tensor to the config's dtype (float32 here, the config has no DeepSpeed bf16/fp16 mode), undoing
the storage-dtype builders. Its memory-efficient linear stays on (it is what deepspeed.initialize enabled
before): without it autograd keeps every gathered frozen LLM weight alive from its forward to its backward
(the visual prompt's gradient passes through the LLM), i.e. the whole LLM on every worker.
The trainable parts (Q-Former, queries, projections, ln_vision) are built plainly and partitioned by
`deepspeed.initialize`, which keeps the frozen parts' existing partitions.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import nn

from blip2_ray.model.partitioned import FrozenConstruction, is_partitioned


def frozen_construction(ds_config: dict) -> FrozenConstruction:
    """Build hooks that partition the frozen parts as they are constructed (needs the process group)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

    # zero.Init reads only the ZeRO section (and checks batch sizes against the world size it sees)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": copy.deepcopy(ds_config["zero_optimization"])}

    @contextlib.contextmanager
    def context():
        with hf_init_deferred(), deepspeed.zero.Init(config_dict_or_path=config,
                                                     tensor_overrides=[DeepSpeedTensorOverride.device]):
            yield

    return FrozenConstruction(context=context, finish=finish_partitioned)


@contextlib.contextmanager
def hf_init_deferred() -> Iterator[None]:
    """transformers models skip their own weight init while constructed (torch's module init still runs).

    An HF model initialises its weights at the end of its __init__, when its children are already
    partitioned: that init would index empty tensors (OPT zeroes its padding row). It runs afterwards,
    gathered, in `finish_partitioned`; tying the LM head to the embeddings still happens.
    """
    from transformers.modeling_utils import PreTrainedModel

    original = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = lambda self: None
    try:
        yield
    finally:
        PreTrainedModel.initialize_weights = original


def finish_partitioned(model: nn.Module, init_weights: bool) -> None:
    """Partition what construction left whole; with `init_weights`, an HF model's own weight init.

    A parameter set on a module after that module's __init__ (HF's Blip2Attention assigns `qkv.bias`) was
    never seen by zero.Init: it is partitioned here, next to the already partitioned ones. The HF init was
    deferred at construction (hf_init_deferred); transformers' ZeRO-3 init gathers each module,
    initialises it on rank 0 and scatters it.
    """
    from transformers.integrations.deepspeed import initialize_weights_zero3

    whole = [p for p in model.parameters() if not is_partitioned(p)]
    if whole:
        partitioned = next(p for p in model.parameters() if is_partitioned(p))
        partitioned.convert_to_zero_parameters(param_list=whole)
    if init_weights:
        for m in model.modules():
            m.__dict__.pop("_is_hf_initialized", None)
        initialize_weights_zero3(model)


def gathered_state(module: nn.Module, rank: int) -> Iterator[tuple[str, torch.Tensor | None]]:
    """(key, tensor) over `module.state_dict()`, a tied tensor under its first key only; every rank iterates.

    Each partitioned parameter is gathered alone, copied to host memory on rank 0 and released again: at
    no time does a rank hold more than one whole parameter beyond its partitions. Other ranks get None.
    """
    import deepspeed

    seen = set()
    for key, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        if is_partitioned(t):
            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                value = t.detach().cpu().clone() if rank == 0 else None
        else:
            value = t.detach().cpu() if rank == 0 else None
        yield key, value
