"""Weight-only int8 for the frozen LLM at serving time: plain PyTorch, symmetric, one scale per output channel.

`quantize_llm(lm, "int8")` replaces the `nn.Linear` layers of the LLM's blocks (attention and FFN; the
output head stays as it is: OPT's is the embedding table too) by `Int8Linear`: int8 weights (1 byte per
parameter instead of bf16's 2) and a scale per output row, w ~ q * scale with q = round(w / scale),
scale = max|w_row| / 127. The matmul dequantises in the input's dtype (`F.linear(x, q.to(x.dtype)) * scale`),
which `torch.compile` fuses into the matmul's weight read, as gpt-fast does; activations stay in the serving
dtype. Its effect on the output is measured, not assumed (`make bench-gpu-serve`, docs/serving.md).

Why not torchao: transformers imports torchao whenever it is installed (about 1.5 s and warnings in every
process that loads a model), and the GPU machines (torch 2.11) do not have it; this needs neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATIONS = ("none", "int8")


class Int8Linear(nn.Module):
    """A frozen linear layer with int8 weights (out, in) and per-output-channel scales (out,)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(w.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        bias = None if linear.bias is None else linear.bias.detach()
        return cls(q, scale.to(w.dtype), bias)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer computes with, in the scale's dtype."""
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_llm(lm: nn.Module, quantization: str) -> int:
    """Quantise the LLM's linear layers in place ("none": leave it); returns how many layers were replaced."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"llm_quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    if quantization == "none":
        return 0
    tied = {id(p) for p in lm.get_input_embeddings().parameters()}
    head = lm.get_output_embeddings()
    targets = [(name, m) for name, m in lm.named_modules()
               if isinstance(m, nn.Linear) and m is not head and id(m.weight) not in tied]
    for name, linear in targets:  # inside the blocks: no device_map hook sits on them
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        setattr(parent, child, Int8Linear.from_linear(linear))
    return len(targets)


def llm_weight_bytes(lm: nn.Module) -> int:
    """Bytes of the LLM's parameters and buffers (each tensor once: a tied head is its embedding table)."""
    seen, total = set(), 0
    for t in list(lm.parameters()) + list(lm.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
