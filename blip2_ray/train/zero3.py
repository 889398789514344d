"""ZeRO-3 on the Train worker: the frozen ViT / LLM built partitioned, and their residency measured.

`frozen_construction(ds_config)` is what the builders take (model/partitioned.py): each frozen part is
constructed inside `deepspeed.zero.Init`, so every parameter is cut into world-size slices as soon as its
module exists (peak: the largest module whole, plus 1/world of the rest), and weight files are read into
each rank's slice (checkpoint_files.assign_weights). Two settings differ from zero.Init's defaults:
  - no dtype override: zero.Init would cast every new floating tensor to the config's dtype (float32
    here, the config has no DeepSpeed bf16/fp16 mode), undoing the storage-dtype builders;
  - no memory-efficient linear: it replaces torch.nn.functional.linear process-wide, which the precision
    policy (model/precision.py) does not need and the tests do not cover.
The trainable parts (Q-Former, queries, projections, ln_vision) are built plainly and partitioned by
`deepspeed.initialize`, which keeps the frozen parts' existing partitions.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

from torch import nn

from blip2_ray.model.partitioned import FrozenConstruction


def frozen_construction(ds_config: dict) -> FrozenConstruction:
    """Build hooks that partition the frozen parts as they are constructed (needs the process group)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

    config = copy.deepcopy(ds_config)
    config["zero_optimization"]["memory_efficient_linear"] = False

    @contextlib.contextmanager
    def context():
        with hf_init_deferred(), deepspeed.zero.Init(config_dict_or_path=config,
                                                     tensor_overrides=[DeepSpeedTensorOverride.device]):
            yield

    return FrozenConstruction(context=context, init_hf_weights=init_hf_weights_partitioned)


@contextlib.contextmanager
def hf_init_deferred() -> Iterator[None]:
    """transformers models skip their own weight init while constructed (torch's module init still runs).

    An HF model initialises its weights at the end of its __init__, when its children are already
    partitioned: that init would index empty tensors (OPT zeroes its padding row). It runs afterwards,
    gathered, in `init_hf_weights_partitioned`; tying the LM head to the embeddings still happens.
    """
    from transformers.modeling_utils import PreTrainedModel

    original = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = lambda self: None
    try:
        yield
    finally:
        PreTrainedModel.initialize_weights = original


def init_hf_weights_partitioned(model: nn.Module) -> None:
    """An HF model's own weight init (its `_init_weights`) on partitioned parameters.

    Deferred at construction (hf_init_deferred); transformers' ZeRO-3 init gathers each module,
    initialises it on rank 0 and scatters it.
    """
    from transformers.integrations.deepspeed import initialize_weights_zero3

    for m in model.modules():
        m.__dict__.pop("_is_hf_initialized", None)
    initialize_weights_zero3(model)
