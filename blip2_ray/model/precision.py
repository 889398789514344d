"""Where the model computes in which dtype, whatever autocast is active around it.

Training runs the trainable parts under autocast (bf16 or fp16) on float32 master weights (train/optim.py,
docs/training.md). Two kinds of places keep their own precision:
  - the frozen ViT and LLM compute in the dtype they are stored in, autocast off: bf16 autocast would
    re-round an fp16 checkpoint's weights in every matmul (and copy them each step);
  - ln_vision, the ITC projections, the ITM head and the ITG LM head compute in float32, so the image
    tokens the Q-Former sees, the ITC/ITM/ITG logits and their losses are float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def autocast_off(device_type: str) -> torch.autocast:
    """A context in which ops run in their inputs' dtypes (no autocast) on `device_type` ("cpu", "cuda", ...)."""
    return torch.autocast(device_type, enabled=False)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (autocast outputs, half weights) as float32; float32 and float64 unchanged.

    float64 passes through so that the model can be checked against a reference in double precision.
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class Float32Linear(nn.Linear):
    """nn.Linear that computes in float32 even under autocast (its weights are the float32 masters).

    A subclass, not a wrapper: the state-dict keys stay `<name>.weight` / `<name>.bias`, as in HF's layout.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast_off(x.device.type):
            bias = None if self.bias is None else at_least_float32(self.bias)
            return F.linear(at_least_float32(x), at_least_float32(self.weight), bias)
