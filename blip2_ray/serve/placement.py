"""Where a caption replica's model lives: loaded in its serving dtype, on one device or with the LLM split
across the replica's GPUs by layer (no Ray here: plain PyTorch, testable on the meta device).

`layer_device_map` balances the LLM's layers (HF's `_no_split_modules` blocks: `OPTDecoderLayer`,
`T5Block`, ...) over the devices by their bytes, in execution order, with the ViT + Q-Former (which
run first) counted on the first device. Embeddings, and anything tied to them (OPT's `lm_head`), go
to the first device; final norms to the device of their stack's last layer; an untied head (FlanT5's
`lm_head`) to the last device. `place_language_model` (model/language_model.py) then moves each
mapped module and its inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from blip2_ray.model.language_model import DeviceMap, place_language_model
from blip2_ray.model.stage2 import Blip2Stage2


def _bytes(tensors, dtype: torch.dtype | None, seen: set[int]) -> int:
    """Bytes of the tensors not in `seen` (adds them); floating-point ones sized as `dtype` when given."""
    total = 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        item = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
        total += t.numel() * item
    return total


def tensor_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the module's parameters and buffers (each counted once; meta tensors count by shape), as
    stored or, with `dtype`, as floating-point tensors would be in that dtype."""
    return _bytes(list(module.parameters()) + list(module.buffers()), dtype, set())


def _layers(lm: nn.Module) -> list[tuple[str, nn.Module]]:
    classes = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [(name, m) for name, m in lm.named_modules() if name and type(m).__name__ in classes]
    if not layers:
        raise ValueError(f"{type(lm).__name__} names no layer class (_no_split_modules) to split by")
    return layers


def layer_device_map(lm: nn.Module, devices: list, first_device_bytes: int = 0,
                     dtype: torch.dtype | None = None) -> dict[str, object]:
    """{module name: device} spreading `lm` over `devices`, balanced by bytes, layers kept whole and in order.

    `first_device_bytes`: what else the first device holds (the ViT, Q-Former and projection).
    `dtype`: size floating-point tensors as this dtype (None: as stored; use it for a meta model).
    Every module that holds parameters or buffers of its own outside the layers gets an entry, so
    tied modules (OPT's `lm_head`) are mapped (and hooked) too.
    """
    layers = _layers(lm)
    layer_names = [name for name, _ in layers]
    seen: set[int] = set()
    tied = {id(p) for p in lm.get_input_embeddings().parameters()}
    head, tail, rest = {}, {}, {}  # first device / last device / by stack
    for name, m in lm.named_modules():
        if not name or any(name == n or name.startswith(n + ".") for n in layer_names):
            continue
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if not own:
            continue
        size = _bytes(own, dtype, seen)
        if any(id(p) in tied for p in own) or "embed" in name.split(".")[-1] or name.split(".")[-1] == "shared":
            head[name] = size
        else:
            rest[name] = size
    sizes = [tensor_bytes(m, dtype) for _, m in layers]
    n = len(devices)
    for name in list(rest):  # final norms, heads: with their stack's last layer (or the last device)
        if not any(name.startswith(ln.rsplit(".", 2)[0] + ".") for ln in layer_names if "." in ln):
            tail[name] = rest.pop(name)
    target = (first_device_bytes + sum(head.values()) + sum(rest.values()) + sum(tail.values()) + sum(sizes)) / n
    loads = [0.0] * n
    loads[0] += first_device_bytes + sum(head.values())
    loads[-1] += sum(tail.values())
    placed, d = {}, 0
    for (name, _), size in zip(layers, sizes):
        # move on once this layer would sit mostly beyond the device's share
        while d < n - 1 and loads[d] + size / 2 > target:
            d += 1
        placed[name] = d
        loads[d] += size
    out: dict[str, object] = {name: devices[0] for name in head}
    out.update({name: devices[d] for name, d in placed.items()})
    for name in rest:
        stack_layers = [ln for ln in layer_names if name.startswith(ln.rsplit(".", 2)[0] + ".")]
        out[name] = devices[placed[stack_layers[-1]]]
    out.update({name: devices[-1] for name in tail})
    return out


def bytes_per_device(lm: nn.Module, device_map: dict[str, object], dtype: torch.dtype | None = None) -> dict:
    """{device: bytes} of `lm`'s tensors under `device_map` (each tensor counted once, where its module maps)."""
    seen: set[int] = set()
    out: dict = {}
    for name in sorted(device_map, key=len, reverse=True):  # children before parents: a child's entry wins
        module = lm.get_submodule(name) if name else lm
        size = _bytes(list(module.parameters()) + list(module.buffers()), dtype, seen)
        out[device_map[name]] = out.get(device_map[name], 0) + size
    return out


def non_llm_bytes(model: nn.Module) -> int:
    """Bytes of a stage-2 model outside its language model (ViT, queries, Q-Former, projection), as stored."""
    return sum(tensor_bytes(m) for name, m in model.named_children() if name != "language_model") + (
        model.query_tokens.numel() * model.query_tokens.element_size())


def load_caption_model(model_dir: str, device: str = "cpu", dtype: str = "float32",
                       gpus_per_replica: float = 1.0, llm_quantization: str = "none") -> Blip2Stage2:
    """The caption replica's model, read by `load_stage2` in `dtype` directly (ViT and LLM; the Q-Former,
    queries and projection stay float32, as the loader keeps them) and placed: on `device`, or with
    `device` "cuda" and `gpus_per_replica` > 1 the LLM split by layer over cuda:0..N-1 (the replica's
    GPUs), the rest on cuda:0. `llm_quantization` "int8": the LLM's block weights then become int8, on their
    devices (model/quantize.py). Eval mode. A question-aware VQA fine-tune (InstructBLIP layout) loads too."""
    from blip2_ray.model.quantize import quantize_llm
    from blip2_ray.model.vision import DTYPES
    from blip2_ray.weights.hf_format import load_stage2

    model = load_stage2(model_dir, vision_dtype=DTYPES[dtype], llm_dtype=DTYPES[dtype])
    n = int(gpus_per_replica) if device == "cuda" else 1
    if n <= 1:
        model = model.to(torch.device(device))
    else:
        devices = [f"cuda:{i}" for i in range(n)]
        split_model(model, layer_device_map(model.language_model, devices, non_llm_bytes(model)), devices[0])
    quantize_llm(model.language_model, llm_quantization)
    return model.eval()


def split_model(model: Blip2Stage2, device_map: DeviceMap, first: str) -> None:
    """Everything but the LLM to `first`; the LLM's modules where `device_map` says (inputs follow them)."""
    for name, child in model.named_children():
        if name != "language_model":
            child.to(first)
    model.query_tokens.data = model.query_tokens.data.to(first)
    model.prompt_ids = model.prompt_ids.to(first)
    place_language_model(model.language_model, device_map)
