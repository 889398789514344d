"""Regional `torch.compile` of a stage model: its repeated blocks and its objectives, not the whole model.

A training step at BLIP-2 sizes issues tens of thousands of small operations; below ~100 samples per GPU the
host issuing them, not the GPU, bounds the step (docs/training.md, "Where the host time goes"). Compiling fuses
them, and compiling *regions* keeps start-up short: one graph serves every block of a kind.

    compile_model(model)    in place; returns a CompiledModel
      - every repeated block, i.e. each module of an nn.ModuleList of >= 2 modules of one class (the ViT blocks,
        the Q-Former layers, the LLM's layers), the Q-Former's LM head and text embeddings, the ViT's patch
        embeddings: the module's `forward` is replaced by
        a compiled one. The module's own call stays eager around it, so hooks on the module (DeepSpeed ZeRO-3
        gathers a module's parameters in them; the caller marks these modules as ZeRO-3 leaves) run outside the
        compiled code. Under ZeRO-3 only the frozen blocks (`trainable_blocks=False`, see compile_model);
      - each Q-Former layer also runs the stage-1 passes' `qformer_passes.layer_step` through its own call;
      - the stage-1 objectives (`model.objectives`: ITC, ITM, ITG arithmetic) with fullgraph=True.
    CompiledModel.warm_up(run)   compile everything a step needs now, timed, with a limit and an eager fallback
    check_compiler(device)       whether compiling works on this platform at all (a C++ compiler on CPU, Triton
                                 on a GPU), as one reason string

Modes of a CompiledModel: "compile" (compile on a first call), "run" (use what is compiled, never start a new
compile: a shape or mode not seen in the warm-up runs eagerly) and "eager" (the fallback). The routing of the
Q-Former layers stays in every mode, so the ZeRO-3 leaf marking stays valid.

Plain PyTorch: no Ray, no DeepSpeed.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from blip2_ray.model import losses
from blip2_ray.model.qformer_passes import LAYER_STEP, layer_step

BACKENDS = ("inductor", "aot_eager", "eager")
RECOMPILE_LIMIT = 64  # variants of one block's code: passes x (cross-attention or not, last layer, batch sizes)


class CompileWarning(UserWarning):
    """Compilation was given up (it failed, or passed its time limit): the step runs eagerly where not compiled."""


def _first_line(e: BaseException) -> str:
    """`Type: first line` of the innermost error (dynamo wraps a backend's error in BackendCompilerFailed)."""
    for _ in range(8):
        inner = getattr(e, "inner_exception", None) or e.__cause__
        if inner is None:
            break
        e = inner
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _probe(x: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.gelu(x) * x.sin()).sum()


def check_compiler(device: torch.device | str, backend: str = "inductor") -> str | None:
    """None when `backend` compiles a small forward and backward on `device`; else why not, in one line."""
    try:
        x = torch.randn(8, 8, device=device, requires_grad=True)
        torch.compile(_probe, backend=backend, fullgraph=True, dynamic=False)(x).backward()
        return None
    except Exception as e:  # any failure of the toolchain: no compiler, no Triton, an unsupported device
        return _first_line(e)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """Each module of every nn.ModuleList of >= 2 modules of one class with parameters, outermost lists only."""
    out: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside or not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        kinds = {type(m) for m in module}
        if len(kinds) == 1 and any(True for _ in module[0].parameters()):
            out.extend(module)
            inside.update(id(m) for block in module for m in block.modules())
    return out


def _is_qformer_layer(module: nn.Module) -> bool:
    return hasattr(module, "feed_forward_chunk_query") and hasattr(module, "attention")


SINGLE_REGIONS = ("QFormerLMHead", "Blip2TextEmbeddings", "Blip2VisionEmbeddings")  # compiled where they occur


def _single_regions(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ in SINGLE_REGIONS]


@dataclass
class _Region:
    """One compiled callable: the eager function, its compiled and run-only forms."""

    eager: Callable
    compiled: Callable
    run_only: Callable


@dataclass
class CompiledModel:
    """The regions of one model compiled by `compile_model`, and how they run now (`mode`)."""

    model: nn.Module
    backend: str | Callable
    modules: list[nn.Module] = field(default_factory=list)  # modules whose forward is compiled
    mode: str = "compile"
    warm_up_s: float | None = None
    fallback_reason: str | None = None

    def _call(self, region: _Region, *args, **kwargs):
        fn = region.compiled if self.mode == "compile" else region.run_only if self.mode == "run" else region.eager
        return fn(*args, **kwargs)

    def region(self, fn: Callable, fullgraph: bool = False) -> Callable:
        """`fn` compiled as a region of this model (called in the current mode)."""
        compiled = torch.compile(fn, backend=self.backend, fullgraph=fullgraph, dynamic=False)
        r = _Region(fn, compiled, torch._dynamo.run(fn))
        return lambda *args, **kwargs: self._call(r, *args, **kwargs)

    def fall_back(self, reason: str) -> None:
        """Run eagerly from now on (every region), saying why once."""
        self.mode, self.fallback_reason = "eager", reason
        warnings.warn(f"train.compile: {reason}; the step runs eagerly", CompileWarning, stacklevel=2)

    def warm_up(self, run: Callable[[], torch.Tensor], params: list[torch.Tensor] | None, time_limit_s: float = 0.0,
                what: str = "train.compile_time_limit_s") -> float:
        """Compile every region a step needs: `run()` (a forward returning the loss) and its backward, the gradient
        returned for `params`, not accumulated into them (no optimizer, no DeepSpeed hook sees it). Returns the
        seconds it took (compilation included). `params` None: the forward only (its graph is dropped; the backward
        graphs compile at the first real backward): for DeepSpeed ZeRO-3, whose backward hooks refuse
        `torch.autograd.grad`.

        A compile error makes the model eager (one CompileWarning naming the reason). Past `time_limit_s` (0: no
        limit) a watchdog says so at once, lets the compile in progress finish and starts no other: what is not
        compiled by then runs eagerly. After the warm-up the mode is "run": nothing compiles mid-run.
        """
        timer = None
        if time_limit_s > 0:
            def expire():
                if self.mode == "compile":
                    self.mode = "run"
                    self.fallback_reason = f"compiling took longer than {what}={time_limit_s:g} s"
                    warnings.warn(f"train.compile: compiling has taken longer than {what}={time_limit_s:g} s; the "
                                  f"compile in progress finishes and no other starts (those regions run eagerly); "
                                  f"raise {what} or set train.compile=false", CompileWarning, stacklevel=1)
            timer = threading.Timer(time_limit_s, expire)
            timer.daemon = True
            timer.start()
        t0 = time.perf_counter()
        try:
            loss = run()
            if params is not None:
                torch.autograd.grad(loss, [p for p in params if p.requires_grad], allow_unused=True)
        except Exception as e:
            if self.mode == "eager":
                raise
            self.fall_back(f"compiling failed ({_first_line(e)})")
        finally:
            if timer is not None:
                timer.cancel()
        self.warm_up_s = time.perf_counter() - t0
        if self.mode == "compile":
            self.mode = "run"
        return self.warm_up_s


def compile_model(model: nn.Module, backend: str | Callable = "inductor",
                  trainable_blocks: bool = True) -> CompiledModel:
    """Compile `model`'s regions in place (lazily: the first call of each compiles it); see the module doc.

    `backend`: one of BACKENDS, or a torch.compile backend function (tests). `trainable_blocks` False: only the
    modules without trainable parameters (the frozen ViT / LLM blocks) and the objectives; for DeepSpeed ZeRO-3,
    which reduces a leaf module's gradients in its backward hook, once per call, while the stage-1 step calls
    each Q-Former layer four times."""
    if isinstance(backend, str) and backend not in BACKENDS:
        raise ValueError(f"compile backend {backend!r} is not one of {', '.join(BACKENDS)}")
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT))
    compiled = CompiledModel(model, backend)
    step = compiled.region(layer_step, fullgraph=True)
    for module in repeated_blocks(model) + _single_regions(model):
        if not trainable_blocks and any(p.requires_grad for p in module.parameters()):
            continue
        if "forward" in vars(module):
            raise ValueError(f"{type(module).__name__} already has its own forward (compiled twice?)")
        forward = compiled.region(module.forward)
        if _is_qformer_layer(module):
            module.forward = _routed(module, forward, step)
            module.runs_layer_step = True
        else:
            module.forward = forward
        compiled.modules.append(module)
    if isinstance(getattr(model, "objectives", None), losses.Objectives):
        model.objectives = _compiled_objectives(compiled)
    model.compiled_regions = compiled
    return compiled


def _routed(layer: nn.Module, forward: Callable, step: Callable) -> Callable:
    """A Q-Former layer's forward: the stage-1 `layer_step` when called with LAYER_STEP first, else HF's."""

    def routed(*args, **kwargs):
        if args and isinstance(args[0], str) and args[0] == LAYER_STEP:
            return step(layer, *args[1:])
        return forward(*args, **kwargs)

    return routed


class _CompiledObjectives(losses.Objectives):
    pass


def _compiled_objectives(compiled: CompiledModel) -> losses.Objectives:
    out = _CompiledObjectives()
    for name in ("itc", "itm_loss", "itg_loss"):
        setattr(out, name, compiled.region(getattr(losses.Objectives, name), fullgraph=True))
    return out
