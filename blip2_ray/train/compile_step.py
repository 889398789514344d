"""`train.compile` in a Train worker: the model's regions compiled (model/compile.py) before DeepSpeed wraps it,
ZeRO-3's leaves marked, everything a step needs compiled on the first micro batch, within a time limit, with
an eager fallback.

    compile_for_training(model, cfg)     before deepspeed.initialize: compile the regions (lazily); under ZeRO-3
                                         only the frozen blocks (ViT, LLM) and the objectives, each compiled block
                                         a ZeRO-3 leaf: DeepSpeed gathers its parameters around its (compiled)
                                         forward and puts no hook inside it (a trainable leaf would have its
                                         gradients reduced once per call: the Q-Former layers run 4 times a step)
    warm_up(engine, cfg, run, rank)      first micro batch: check that this platform compiles at all, then compile
                                         the forward and backward of the step (model/compile.CompiledModel.warm_up;
                                         ZeRO-3: the forward, the backward compiles in the first step)

Bad input: where compiling fails (no C++ compiler, no Triton, an unsupported operation) the run trains eagerly
after one CompileWarning naming the reason; past train.compile_time_limit_s the run says so and compiles nothing
more. Neither stops the run.
"""

from __future__ import annotations

from typing import Callable

import torch

from blip2_ray.model.compile import CompiledModel, check_compiler, compile_model
from blip2_ray.train.config import PretrainConfig


def compile_for_training(model: torch.nn.Module, cfg: PretrainConfig) -> CompiledModel | None:
    """Compile `model`'s regions in place when cfg.compile_step (train.compile; null: with GPUs); None if off."""
    if not cfg.compile_step:
        return None
    zero3 = cfg.deepspeed.zero_stage == 3
    compiled = compile_model(model, cfg.train.compile_backend, trainable_blocks=not zero3)
    if zero3:
        from deepspeed.utils import set_z3_leaf_module

        for module in compiled.modules:
            set_z3_leaf_module(module, True)
    return compiled


def compiled_regions(module: torch.nn.Module) -> CompiledModel | None:
    return getattr(module, "compiled_regions", None)


def warm_up(engine, cfg: PretrainConfig, run: Callable[[], dict], rank: int) -> None:
    """Before the first step (all ranks call): compile what the step needs, running `run()` (the step's forward,
    returning its outputs) and its backward without touching any gradient. Once per run; nothing when off."""
    compiled = compiled_regions(engine.module)
    if compiled is None or compiled.warm_up_s is not None:
        return
    reason = check_compiler(engine.device, cfg.train.compile_backend)
    if reason is not None:
        compiled.fall_back(f"this platform cannot compile ({reason})")
        compiled.warm_up_s = 0.0
    else:
        # ZeRO-3's backward hooks refuse torch.autograd.grad: there the backward compiles in the first real step
        params = None if cfg.deepspeed.zero_stage == 3 else [p for p in engine.module.parameters() if p.requires_grad]
        compiled.warm_up(lambda: run()["loss"], params, cfg.train.compile_time_limit_s)
    if rank == 0:
        state = ("eagerly: " + compiled.fallback_reason) if compiled.mode == "eager" else (
            f"{len(compiled.modules)} blocks and the objectives compiled ({cfg.train.compile_backend}) in "
            f"{compiled.warm_up_s:.1f} s" + (f"; {compiled.fallback_reason}" if compiled.fallback_reason else ""))
        print(f"[stage{cfg.stage}] step {state}", flush=True)
