"""The HF export of a model that no process holds whole (ZeRO-3): tensors streamed into safetensors shards.

`export_streamed(model, stage, tensors, ...)` writes the same directory as hf_format.export_stage1/2 (HF
config, weights, processor / tokenizer, our model config, stage-1 extras), but the weights come from
`tensors`, an iterator of (state-dict key, tensor) in which each tensor may be gathered only while it is
being handed over (train/zero3.gathered_state); they are written in shards of at most `max_shard_bytes`
(`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, as transformers shards), so the
writer holds one shard at a time. `model` is the partitioned module: it supplies the configs and the keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from blip2_ray.config import dump_yaml
from blip2_ray.model.config import ModelConfig
from blip2_ray.weights.hf_configs import _is_tied, stage1_hf_config, stage2_hf_class, stage2_hf_config
from blip2_ray.weights.hf_format import (
    export_vocab_rows,
    grow_vocab_rows,
    image_processor,
    image_token_index_of,
    stage2_processor,
    vocab_row_keys,
)
from blip2_ray.weights.native_format import is_clip_vision, native_key_shapes, write_native_config
from blip2_ray.weights.weight_sources import CONFIG_FILE, EXTRAS_FILE

SHARD_BYTES = 2 << 30
INDEX_FILE = "model.safetensors.index.json"


def hf_key_shapes(cls, config) -> dict[str, tuple[int, ...]]:
    """Every key `cls(config).state_dict()` has, a tied tensor under its first name only, with its shape
    (what save_pretrained writes); built on meta."""
    with torch.device("meta"):
        hf = cls(config)
    out, seen = {}, set()
    for k, v in hf.state_dict(keep_vars=True).items():
        if id(v) not in seen:
            seen.add(id(v))
            out[k] = tuple(v.shape)
    return out


class ShardWriter:
    """safetensors shards of at most `max_bytes` each, then the index (or one `model.safetensors`)."""

    def __init__(self, out: Path, max_bytes: int = SHARD_BYTES):
        self.out, self.max_bytes = out, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self.total = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[key] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"shard-{len(self.written):05d}.tmp"
        save_file(self.pending, str(self.out / name), metadata={"format": "pt"})
        self.written.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        if n == 1:
            (self.out / self.written[0][0]).rename(self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (name, keys) in enumerate(self.written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.out / name).rename(self.out / final)
            weight_map.update(dict.fromkeys(keys, final))
        (self.out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": self.total},
                                                       "weight_map": weight_map}, indent=2))


def export_streamed(model, stage: int, tensors: Iterable[tuple[str, torch.Tensor | None]], out_dir: str | None,
                    tokenizer, model_cfg: ModelConfig | None = None, max_shard_bytes: int = SHARD_BYTES,
                    qformer_tokenizer=None) -> str | None:
    """Write the HF export of `model` from `tensors` (every rank iterates them; `out_dir` None: only iterate).

    Keys and shapes are checked against the HF class (missing or unexpected keys: RuntimeError); a tensor
    whose shape differs only by a 1-element vectorisation (the ITC temperature) takes the HF shape.
    """
    from transformers import Blip2ForImageTextRetrieval, GenerationConfig

    if out_dir is None:
        for _ in tensors:
            pass
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if stage == 2:
        processor = stage2_processor(model, tokenizer, qformer_tokenizer)
        index = image_token_index_of(model, tokenizer)
        rows = export_vocab_rows(model, index)  # a Llama-2 vocabulary grows a row for <image> (and padding)
        cls, config = stage2_hf_class(model), stage2_hf_config(model, index, rows)
        if rows is not None:
            grow = vocab_row_keys(model)
            tensors = ((k, grow_vocab_rows(t, rows) if k in grow and t is not None else t) for k, t in tensors)
    else:
        cls, config = Blip2ForImageTextRetrieval, stage1_hf_config(model)
    native = is_clip_vision(model.vision_model)  # no HF class holds it: our own format (native_format.py)
    shapes = native_key_shapes(hf_key_shapes(cls, config), model) if native else hf_key_shapes(cls, config)
    extras: dict[str, torch.Tensor] = {}
    writer = ShardWriter(out, max_shard_bytes)
    seen = set()
    for key, tensor in tensors:
        if stage == 1 and (key.startswith("lm_head.") or key == "temp"):
            extras[key] = tensor.reshape(()) if key == "temp" else tensor
            continue
        if key not in shapes:
            if _is_tied(key):
                continue
            raise RuntimeError(f"state does not match {cls.__name__}: unexpected {key}")
        if tuple(tensor.shape) != shapes[key] and tensor.numel() == 1:
            tensor = tensor.reshape(shapes[key])
        writer.add(key, tensor)
        seen.add(key)
    missing = sorted(set(shapes) - seen)
    if missing:
        raise RuntimeError(f"state does not match {cls.__name__}: missing {missing[:5]}")
    writer.close()
    config.architectures = [cls.__name__]
    if native:
        write_native_config(out, config, cls.__name__, model.vision_model)
    else:
        config.save_pretrained(str(out))
    if stage == 2:
        GenerationConfig.from_model_config(config).save_pretrained(str(out))
        processor.save_pretrained(str(out))
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in extras.items()}, str(out / EXTRAS_FILE))
        tokenizer.save_pretrained(str(out))
        image_processor(model.vision_model.config.image_size).save_pretrained(str(out))
    if model_cfg is not None:
        (out / CONFIG_FILE).write_text(dump_yaml(model_cfg))
    return str(out)
