"""All-gathers for the stage-1 losses over torch.distributed (world size 1 or no process group: identity), and
DeepSpeed's communication backend without the CPU kernel that training never calls."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def world_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (W*B, ...) in rank order, detached.

    ITC compares the local rows with every rank's features; the other ranks' rows are constants here
    (each rank back-propagates through its own rows), as in the reference.
    """
    if world_size() == 1:
        return x
    with torch.no_grad():
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.batch = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # each rank's copy of the gathered tensor received gradient: sum them, keep this rank's rows
        grad = grad.contiguous()
        dist.all_reduce(grad)
        r = dist.get_rank()
        return grad[r * ctx.batch:(r + 1) * ctx.batch]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (W*B, ...); gradient flows back to the rank that owns each row.

    The stage-1 step no longer uses it (ITM gathers the frozen trunk output without gradient and applies
    ln_vision locally, docs/stage1_step.md); the formulation it replaced, written out in the tests, does.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def without_deepspeed_shm_kernel() -> None:
    """Keep DeepSpeed from building its CPU shared-memory all-reduce when it first makes its communication backend.

    On the CPU accelerator DeepSpeed's TorchBackend JIT-compiles a C++ extension (deepspeed_shm_comm) at that
    moment: ~45 s of both cores of an idle 2-core machine, minutes on a busy one, and again for every new virtual
    environment path (the build is keyed by compiler flags that hold the venv's paths: each fresh clone, each CI
    run, each `make demo` on a new machine). The kernel serves only `inference_all_reduce` (DeepSpeed inference's
    tensor parallelism); ZeRO training reduces through torch.distributed (gloo here) with or without it. Called
    before deepspeed.initialize and zero.Init; without the CPU accelerator there is nothing to skip.
    """
    import importlib

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # the module itself: `import deepspeed.comm.torch` resolves to the torch that deepspeed.comm re-exports
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
