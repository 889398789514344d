"""How modules are constructed: in a dtype, with parameters on the meta device, or partitioned (ZeRO-3).

Under ZeRO-3 the training worker builds the frozen ViT and LLM inside `deepspeed.zero.Init` (train/zero3.py):
each parameter is cut into world-size slices as soon as its module is constructed, so no worker ever holds
a whole frozen model. Such a parameter's `.data` is empty; its slice lives in `p.ds_tensor` (flat, rank r
holding elements [r * n, (r + 1) * n) of the flattened tensor, the last slice zero-padded) and its full
shape in `p.ds_shape`. Model code only duck-types these attributes: DeepSpeed is imported by train/.

Loading a weight file into such a parameter writes this rank's slice only (weights/checkpoint_files.py,
`load_into_partition`): every rank reads the tensor from the (memory-mapped) file, none gathers it.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

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


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Floating-point parameters created inside are allocated in `dtype` (no float32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters created inside live on the meta device (no memory, no init cost); buffers stay real.

    Buffers (rotary frequencies, position ids) are computed at construction and are not in checkpoints,
    so they must be real; parameters get their values from `assign_weights` afterwards.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param):
        original(module, name, param)
        p = module._parameters.get(name)
        if p is not None and p.device.type != "meta":
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def construction_context(construction: FrozenConstruction | None) -> ContextManager:
    return construction.context() if construction is not None else contextlib.nullcontext()


def is_partitioned(t: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its values live in this rank's `ds_tensor` slice)."""
    return getattr(t, "ds_tensor", None) is not None


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The tensor's shape; for a partitioned parameter the whole parameter's, not its empty `.data`'s."""
    return tuple(t.ds_shape) if is_partitioned(t) else tuple(t.shape)


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
