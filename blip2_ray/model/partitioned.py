"""Frozen parts constructed partitioned (ZeRO-3): the hooks the builders take, and tensors into partitions.

Under ZeRO-3 the training worker builds the frozen ViT and LLM inside `deepspeed.zero.Init` (train/zero3.py):
each parameter is cut into world-size slices as soon as its module is constructed, so no worker ever holds
a whole frozen model. Such a parameter's `.data` is empty; its slice lives in `p.ds_tensor` (flat, rank r
holding elements [r * n, (r + 1) * n) of the flattened tensor, the last slice zero-padded) and its full
shape in `p.ds_shape`. Model code only duck-types these attributes: DeepSpeed is imported by train/.

Loading a weight file into such a parameter writes this rank's slice only (`load_into_partition`): every
rank reads the tensor from the (memory-mapped) file, none gathers the parameter, nothing is broadcast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn


@dataclass
class FrozenConstruction:
    """How the builders construct the frozen ViT / LLM when they are to be partitioned as built.

    `context()`: entered around each frozen part's construction (deepspeed.zero.Init). `finish(model,
    init_weights)`: partitions the parameters a module registered after its own construction (HF's
    Blip2Attention sets `qkv.bias` on its child), and with `init_weights` re-runs an HF model's own weight
    init on its partitioned parameters (an HF model initialises its weights after its children were
    constructed, i.e. already partitioned, so that init would be lost).
    """

    context: Callable[[], ContextManager]
    finish: Callable[[nn.Module, bool], None]


def construction_context(construction: FrozenConstruction | None) -> ContextManager:
    return construction.context() if construction is not None else contextlib.nullcontext()


def is_partitioned(t: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its values live in this rank's `ds_tensor` slice)."""
    return getattr(t, "ds_tensor", None) is not None


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The tensor's shape; for a partitioned parameter the whole parameter's, not its empty `.data`'s."""
    return tuple(t.ds_shape) if is_partitioned(t) else tuple(t.shape)


@torch.no_grad()
def load_into_partition(p: torch.Tensor, value: torch.Tensor) -> None:
    """Copy this rank's slice of `value` (the whole tensor, any dtype) into partitioned parameter `p`.

    The slice is cast to the partition's dtype. When the parameter is also whole right now (gathered, or
    persistent below DeepSpeed's threshold) that copy is written too.
    """
    part = p.ds_tensor
    n = part.numel()
    start = p.ds_zero_partition_rank * n
    flat = value.reshape(-1)
    chunk = flat[start:start + n]
    if chunk.numel():
        part.narrow(0, 0, chunk.numel()).copy_(chunk)
    if p.data.numel() == value.numel():
        p.data.copy_(value.reshape(p.data.shape))


def set_parameter_dtype(module: nn.Module, dtype: torch.dtype) -> None:
    """Store every parameter of `module` in `dtype`, partitioned ones included (their slice and `.data`)."""
    for p in module.parameters():
        if p.dtype == dtype:
            continue
        if is_partitioned(p):
            p.ds_tensor.data = p.ds_tensor.data.to(dtype)
        p.data = p.data.to(dtype)


def held_numel(module: nn.Module, frozen_only: bool = True) -> tuple[int, int]:
    """(elements this rank holds, elements of the whole parameters) over `module`'s (frozen) parameters.

    A partitioned parameter that is not gathered right now counts its slice; any other its whole size.
    """
    held = total = 0
    for p in module.parameters():
        if frozen_only and p.requires_grad:
            continue
        full = int(getattr(p, "ds_numel", p.numel()))
        total += full
        held += p.ds_tensor.numel() if is_partitioned(p) and p.data.numel() == 0 else p.data.numel()
    return held, total
