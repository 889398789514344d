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

Two memory fixes of DeepSpeed 0.19 on the worker (docs/training.md, ZeRO-3 memory):
- `gloo_collectives_in_place`: gloo's all-gather receives into a temporary of the whole output and copies
  it out, so every gathered parameter cost twice its size (the tied OPT embedding / LM head: 2 x 257 MB,
  three times a step); its reduce-scatter copies the whole input first (a gradient bucket: 5e7 float32
  elements, 190 MiB). On gloo they become one broadcast / one reduce per rank, in place (the same bytes on
  the wire, no temporary).
- `share_fp32_partitions`: with autocast the trainable parameters are float32 already and DeepSpeed means
  its "fp32 master partition" to be the parameter partition itself; its device check compares a
  torch.device with a string (never equal), so it keeps a second copy. It is dropped after initialize.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from blip2_ray.model.partitioned import FrozenConstruction, is_partitioned
from blip2_ray.train.distributed import without_deepspeed_shm_kernel


def frozen_construction(ds_config: dict) -> FrozenConstruction:
    """Build hooks that partition the frozen parts as they are constructed (needs the process group)."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import DeepSpeedTensorOverride

    without_deepspeed_shm_kernel()
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


class _Works:
    """The handles of several async collectives as one (`wait` waits for all)."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> bool:
        for w in self.works:
            w.wait()
        return True

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)


def gloo_collectives_in_place() -> None:
    """Route ZeRO-3's parameter all-gather and gradient reduce-scatter around gloo's whole-size temporaries.

    deepspeed.comm.allgather_fn (each gathered parameter): on a gloo group with a contiguous CPU output,
    this rank's input is put into its slice and every rank broadcasts its slice, received in place.
    deepspeed.comm.reduce_scatter_fn (each gradient bucket; ZeRO-3 passes the slice of the flat bucket that
    is this rank's as the output): on gloo, when the output is that slice, one reduce per rank of its slice
    to that rank (the bucket is scratch: DeepSpeed divided it in place already). Any other case goes to
    DeepSpeed's own function. Same values in the same places; idempotent.
    """
    import deepspeed.comm as ds_comm

    if getattr(ds_comm.allgather_fn, "_blip2_in_place", False):
        return
    allgather, reduce_scatter = ds_comm.allgather_fn, ds_comm.reduce_scatter_fn

    def allgather_fn(output_tensor, input_tensor, group=None, async_op=False, **kwargs):
        slices = _rank_slices(output_tensor, input_tensor.numel(), group)
        if slices is None:
            return allgather(output_tensor, input_tensor, group=group, async_op=async_op, **kwargs)
        rank = dist.get_rank(group)
        if slices[rank].data_ptr() != input_tensor.data_ptr():
            slices[rank].copy_(input_tensor.reshape(-1))
        return _finish([dist.broadcast(t, src=_global(group, r), group=group, async_op=True)
                        for r, t in enumerate(slices)], async_op)

    def reduce_scatter_fn(output_tensor, tensor, op=dist.ReduceOp.SUM, group=None, async_op=False, **kwargs):
        slices = _rank_slices(tensor, output_tensor.numel(), group)
        if (slices is None or not output_tensor.is_contiguous()
                or slices[dist.get_rank(group)].data_ptr() != output_tensor.data_ptr()):
            return reduce_scatter(output_tensor, tensor, op=op, group=group, async_op=async_op, **kwargs)
        return _finish([dist.reduce(t, dst=_global(group, r), op=op, group=group, async_op=True)
                        for r, t in enumerate(slices)], async_op)

    allgather_fn._blip2_in_place = True
    ds_comm.allgather_fn, ds_comm.reduce_scatter_fn = allgather_fn, reduce_scatter_fn


def _rank_slices(flat: torch.Tensor, n: int, group) -> tuple[torch.Tensor, ...] | None:
    """`flat` (world x n elements, contiguous, on the CPU, a gloo group of 2+) as its world slices; else None."""
    world = dist.get_world_size(group)
    if (world == 1 or dist.get_backend(group) != "gloo" or flat.device.type != "cpu" or not flat.is_contiguous()
            or flat.numel() != world * n):
        return None
    return flat.view(-1).split(n)


def _global(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def _finish(works: list, async_op: bool):
    handle = _Works(works)
    if async_op:
        return handle
    handle.wait()
    return None


def share_fp32_partitions(optimizer) -> int:
    """Make each float32 "master" partition of a ZeRO-3 optimizer its parameter partition; bytes freed.

    Only where both have the same dtype, device and size (autocast: trainable parameters stored in float32)
    and the optimizer holds no state for the copy yet (right after deepspeed.initialize). The values are
    equal (the copy was cloned from the partition), and DeepSpeed's step copies the updated master back
    into the partition (a copy onto itself now).
    """
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    params = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    if flats is None or params is None or getattr(optimizer, "offload_optimizer", False):
        return 0
    state = optimizer.optimizer.state
    freed = 0
    for i, (master, part) in enumerate(zip(flats, params)):
        if (part is None or master is part or master.dtype != part.dtype or master.device != part.device
                or master.shape != part.shape or state.get(master)):
            continue
        part.ds_id = master.ds_id
        part.requires_grad = True  # as DeepSpeed marks its master partitions
        flats[i] = part
        freed += master.numel() * master.element_size()
    return freed
