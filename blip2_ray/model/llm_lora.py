"""LoRA adapters on the frozen LLM of a stage-2 model (peft's LoRA layers injected in place), their merge into
the LLM's weights at export and the adapters alone in peft's format. Ray-free.

`add_llm_lora(model, r, alpha, dropout, targets)` wraps the named linear modules of `model.language_model`
(q_proj -> q_proj.base_layer + lora_A / lora_B): the base weights stay frozen in their storage dtype, the adapters
train in float32 (master weights, as the Q-Former's) with their dropout active while training (the frozen LLM
itself stays in eval mode). Under ZeRO-3 the base layers arrive partitioned (model/partitioned.py) and the adapters
are partitioned by deepspeed.initialize with the other trainable parameters.

Export (`merged_lora_state`): a stream of (state-dict key, tensor) as train/zero3.gathered_state yields it becomes
the stream of the plain LLM, W + (B @ A) * alpha / r under the base key, so the export is an ordinary
Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration directory; `save_lora_adapter` writes the
adapters as `PeftModel.save_pretrained` does (adapter_config.json + adapter_model.safetensors), loadable with
`PeftModel.from_pretrained(<the LLM>, dir)`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from blip2_ray.errors import UserError

ADAPTER = "default"  # peft's adapter name; dropped from the keys peft saves
ADAPTER_DIR = "llm_lora_adapter"
_LORA_KEY = re.compile(rf"^(.*)\.(base_layer\.weight|base_layer\.bias|lora_A\.{ADAPTER}\.weight|"
                       rf"lora_B\.{ADAPTER}\.weight)$")


def linear_module_names(llm: nn.Module) -> list[str]:
    """The leaf names of the LLM's linear layers (nn.Linear, GPT-2's Conv1D): what LoRA can target."""
    from transformers.pytorch_utils import Conv1D

    names = set()
    for name, m in llm.named_modules():
        if isinstance(m, (nn.Linear, Conv1D)) and name:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def default_targets(family: str) -> list[str] | None:
    """peft's default LoRA targets of an LLM family (its model_type), or None when peft has none."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(family)
    return list(targets) if targets else None


def resolve_targets(llm: nn.Module, targets: list[str] | None, key: str = "llm_lora.target_modules") -> list[str]:
    """The target modules (None: peft's default for the LLM's family); UserError naming the modules it has when
    one is missing."""
    family = getattr(llm.config, "model_type", "?")
    has = linear_module_names(llm)
    if targets is None:
        targets = default_targets(family)
        if targets is None:
            raise UserError(f"peft has no default LoRA targets for the {family} LLM; set {key} to some of its "
                            f"linear modules: {', '.join(has)}")
    missing = [t for t in targets if t.rsplit(".", 1)[-1] not in has]
    if missing:
        raise UserError(f"{key} names {', '.join(repr(t) for t in missing)}, which the {family} LLM does not have; "
                        f"its linear modules are: {', '.join(has)}")
    return list(targets)


def lora_config(r: int, alpha: float, dropout: float, targets: list[str], decoder: bool = True):
    """The peft LoraConfig of the adapters (bias none, no rsLoRA / DoRA: the merge is W + B A alpha / r)."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none",
                      task_type="CAUSAL_LM" if decoder else "SEQ_2_SEQ_LM")


def add_llm_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: list[str] | None) -> list[str]:
    """Inject LoRA adapters into `model.language_model` in place; returns the targets. Only the adapters of the
    LLM train (float32); the base layers keep their dtype and stay frozen."""
    from peft import inject_adapter_in_model

    llm = model.language_model
    targets = resolve_targets(llm, targets)
    inject_adapter_in_model(lora_config(r, alpha, dropout, targets, llm_is_causal(llm)), llm, adapter_name=ADAPTER)
    for name, p in llm.named_parameters():
        is_adapter = ".lora_A." in name or ".lora_B." in name
        p.requires_grad_(is_adapter)
        if is_adapter and p.dtype != torch.float32:
            p.data = p.data.float()
    for name, m in llm.named_modules():
        if ".lora_dropout." in f"{name}.":
            m.trains_in_frozen_llm = True  # Blip2Stage2.train keeps it training while the LLM stays in eval
    model.llm_lora = {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}
    return targets


def llm_is_causal(llm: nn.Module) -> bool:
    return not getattr(llm.config, "is_encoder_decoder", False)


def lora_layers(module: nn.Module) -> dict[str, nn.Module]:
    """{module path: peft LoRA layer} inside `module`."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def merged_lora_state(module: nn.Module, tensors: Iterable[tuple[str, torch.Tensor | None]],
                      adapters: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
    """`tensors` (module's state-dict stream; None values on ranks that only take part in the gathers) with each
    LoRA layer folded back into a plain one: `<path>.weight` = W + (B @ A) * scaling (transposed for GPT-2's
    Conv1D), `<path>.bias` = the base bias. With `adapters`, A and B are also collected there under
    `<path>.lora_A.<adapter>.weight` / `...lora_B...` (for save_lora_adapter). Without LoRA: `tensors` unchanged.
    Holds one base weight at a time (until its A and B arrive)."""
    layers = lora_layers(module)
    if not layers:
        yield from tensors
        return
    pending: dict[str, dict[str, torch.Tensor | None]] = {}
    for key, t in tensors:
        m = _LORA_KEY.match(key)
        if m is None or m.group(1) not in layers:
            yield key, t
            continue
        path, part = m.groups()
        if part == "base_layer.bias":
            yield f"{path}.bias", t
            continue
        if adapters is not None and part.startswith("lora_") and t is not None:
            adapters[key] = t.detach().float().cpu()
        got = pending.setdefault(path, {})
        got[part] = t
        if len(got) < 3:
            continue
        del pending[path]
        w, a, b = got["base_layer.weight"], got[f"lora_A.{ADAPTER}.weight"], got[f"lora_B.{ADAPTER}.weight"]
        if w is None:
            yield f"{path}.weight", None
            continue
        layer = layers[path]
        delta = b.float() @ a.float() * layer.scaling[ADAPTER]  # (out, r) @ (r, in)
        if getattr(layer, "fan_in_fan_out", False):
            delta = delta.T
        yield f"{path}.weight", (w.float() + delta).to(w.dtype)
    if pending:
        raise RuntimeError(f"LoRA layers {sorted(pending)[:3]} arrived without their base weight or adapters")


def save_lora_adapter(out_dir: str, adapters: dict[str, torch.Tensor], lora: dict, llm_config,
                      prefix: str = "language_model.") -> str:
    """Write `adapters` ({model key: tensor} from merged_lora_state) as peft saves a LoRA adapter of the LLM:
    adapter_model.safetensors (keys base_model.model.<path in the LLM>.lora_A.weight) and adapter_config.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, t in adapters.items():
        inner = key[len(prefix):] if key.startswith(prefix) else key
        state["base_model.model." + inner.replace(f".{ADAPTER}.", ".")] = t.contiguous()
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    causal = not getattr(llm_config, "is_encoder_decoder", False)
    cfg = lora_config(lora["r"], lora["alpha"], lora["dropout"], lora["targets"], causal)
    cfg.base_model_name_or_path = getattr(llm_config, "_name_or_path", "") or None
    cfg.save_pretrained(str(out))
    return str(out)
