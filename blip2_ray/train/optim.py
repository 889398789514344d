"""Optimizer parameter groups, the warmup + cosine schedule and the DeepSpeed config dict.

Plain functions of the config (no Ray, no DeepSpeed import): unit-testable, and the only place
the DeepSpeed settings are decided.
"""

from __future__ import annotations

import math
from typing import Callable

from torch import nn

from blip2_ray.train.config import PretrainConfig


def no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms (any 1-d weight), the learned queries and the temperature get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name.lower() or name in ("query_tokens", "temp")


def param_groups(model: nn.Module, weight_decay: float, lr_scale: Callable[[str], float] | None = None,
                 lr: float | None = None) -> list[dict]:
    """Trainable parameters only (the frozen ViT/LLM never reach the optimizer), in two decay groups.

    With `lr_scale` (parameter name -> multiplier of `lr`; layer-wise decay of a fine-tuned ViT) the
    groups are split further by multiplier, each with its own "lr" (LambdaLR scales each group's lr).
    """
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = lr_scale(name) if lr_scale is not None else 1.0
        groups.setdefault((no_decay(name, p), scale), []).append(p)
    out = []
    for (plain, scale), params in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        group = {"params": params, "weight_decay": 0.0 if plain else weight_decay}
        if lr_scale is not None:
            group["lr"] = lr * scale
        out.append(group)
    return out


def warmup_cosine(max_steps: int, warmup_steps: int, lr: float, min_lr: float,
                  warmup_start_lr: float = 0.0) -> Callable[[int], float]:
    """step -> lr multiplier (of `lr`): linear warmup from warmup_start_lr, then cosine to min_lr at max_steps.

    A closure (not an object) on purpose: LambdaLR then leaves it out of its state_dict, so a resumed
    run with a longer max_steps follows the new schedule from the restored step.
    """
    warmup_steps = min(warmup_steps, max_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (warmup_start_lr + (lr - warmup_start_lr) * step / warmup_steps) / lr
        span = max(1, max_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr

    return multiplier


def deepspeed_config(cfg: PretrainConfig) -> dict:
    """The DeepSpeed config of a run: ZeRO stage, batch sizes, AdamW, precision (autocast), clipping."""
    t, ds = cfg.train, cfg.deepspeed
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": (default_contiguous_gradients(cfg) if ds.contiguous_gradients is None
                                 else ds.contiguous_gradients),
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 2 and t.grad_clip == 0:
        # without clipping nothing needs the gradient norm, and ZeRO-2 would read it on the host at every step (a
        # device sync: it checks the norm's validity in Python)
        zero["compute_grad_norm"] = False
    if ds.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = ds.stage3_param_persistence_threshold
        zero["stage3_max_live_parameters"] = ds.stage3_max_live_parameters
        zero["stage3_max_reuse_distance"] = ds.stage3_max_live_parameters
        zero["stage3_prefetch_bucket_size"] = ds.stage3_prefetch_bucket_size
        zero["sub_group_size"] = ds.stage3_sub_group_size
        # the export gathers the trainable weights itself; no 16-bit copy at every save
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    out = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: no JIT-built fused kernel (fails on some GPUs, absent on CPU)
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay,
                       "torch_adam": True},
        },
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if t.precision != "fp32":
        # torch.autocast inside the engine's forward, not DeepSpeed's bf16/fp16 modes: those cast every
        # parameter (the frozen ViT/LLM and ln_vision too). Parameters stay as built (trainable float32 =
        # the master weights, frozen parts in their storage dtype); fp16 adds DeepSpeed's GradScaler.
        # No lower-precision-safe modules: gradients are reduced in float32 (docs/training.md).
        out["torch_autocast"] = {"enabled": True, "dtype": AUTOCAST_DTYPES[t.precision],
                                 "lower_precision_safe_modules": []}
    return out


def default_contiguous_gradients(cfg: PretrainConfig) -> bool:
    """deepspeed.contiguous_gradients: null -> on with 2+ workers, except ZeRO-3 on CPU (config.py says why)."""
    if cfg.scaling.num_workers < 2:
        return False
    return not (cfg.deepspeed.zero_stage == 3 and not cfg.scaling.use_gpu)


AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
