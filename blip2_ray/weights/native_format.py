"""Our own export format, for the models HF's BLIP-2 classes cannot hold: those with a CLIP ViT-L/14 encoder.

transformers' `Blip2ForImageTextRetrieval`, `Blip2ForConditionalGeneration` and
`InstructBlipForConditionalGeneration` hold only the EVA ViT-g (`Blip2VisionModel`). A model whose image
encoder is a CLIP ViT-L exports to a directory laid out as the HF export of the same stage would be (the
same files; the same tensor names for the queries, Q-Former, heads, projection and LLM; the same processor,
tokenizer and `blip2_ray_model.yaml`), except for two things (docs/checkpoints.md, "Our CLIP ViT-L format"):

- `config.json`: `model_type` "blip2_ray" (so transformers refuses the directory instead of loading it with a
  random EVA ViT), `architectures` the HF class it mirrors, `vision_config` the `CLIPVisionConfig` of the kept
  layers (+ `ln_vision_eps` where it is not the ViT's own), `blip2_ray_format` {"version", "vision"};
- the ViT's tensors: `vision_model.clip.*` in `CLIPVisionModel`'s names, ln_vision as `vision_model.post_layernorm.*`.

Every loader reads it where it reads the HF format: `hf_format.load_stage1` / `load_stage2` (so Serve,
evaluation, CapFilt and fine-tuning), `model.init_from` and `model.vision.path` (weight_sources.py).
Ray-free, plain PyTorch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from blip2_ray.errors import UserError
from blip2_ray.model.partitioned import parameters_on_meta
from blip2_ray.weights.checkpoint_files import TensorFiles, assign_weights, require_materialized
from blip2_ray.weights.export_kinds import NATIVE_MODEL_TYPE

FORMAT_VERSION = 1
# the fields a Blip2VisionConfig and a CLIPVisionConfig share: a stand-in vision config carries them
_SHARED_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                         "image_size", "patch_size", "layer_norm_eps", "ln_vision_eps")


def is_clip_vision(vision_model: nn.Module) -> bool:
    """Whether an image encoder needs this format (no HF BLIP-2 class holds it)."""
    from blip2_ray.model.vision import ClipVisionTower

    return isinstance(vision_model, ClipVisionTower)


def meta_copy(vision_model: nn.Module) -> nn.Module:
    """A CLIP tower of the same sizes as `vision_model`, its parameters on the meta device (to be assigned)."""
    return meta_copy_of_fields(vision_fields({"vision_config": vision_model.config.to_dict()}))


def meta_copy_of_fields(fields: dict) -> nn.Module:
    """A CLIP tower of the `model.vision` sizes `fields`, its parameters on the meta device."""
    from blip2_ray.config import from_dict
    from blip2_ray.model.config import VisionConfig
    from blip2_ray.model.vision import vision_module

    with parameters_on_meta():
        return vision_module(from_dict(VisionConfig, {**fields, "dtype": "float32"}))


def stand_in_vision_config(vision: dict) -> dict:
    """A Blip2VisionConfig mapping with the CLIP ViT's sizes: what the mirrored HF config is built with (the
    Q-Former's cross-attention width comes from it); the HF ViT itself is never built."""
    return {k: vision[k] for k in _SHARED_VISION_FIELDS if k in vision}


def native_config_json(hf_config, cls_name: str, vision_model: nn.Module) -> dict:
    """config.json of the export: `hf_config` (the mirrored class's config, built with the stand-in vision
    config) with our model_type, the CLIP vision config and the format record."""
    data = hf_config.to_dict()
    vision = vision_model.config.to_dict()
    eps = vision_model.post_layernorm.eps
    if eps != vision_model.config.layer_norm_eps:
        vision["ln_vision_eps"] = eps
    data.update(model_type=NATIVE_MODEL_TYPE, architectures=[cls_name], vision_config=vision,
                blip2_ray_format={"version": FORMAT_VERSION, "vision": "clip_vit_l"})
    return data


def write_native_config(out: Path, hf_config, cls_name: str, vision_model: nn.Module) -> None:
    (out / "config.json").write_text(json.dumps(native_config_json(hf_config, cls_name, vision_model), indent=2,
                                                sort_keys=True) + "\n")


def _check_format(path: str, data: dict) -> None:
    fmt = data.get("blip2_ray_format") or {}
    if fmt.get("version") != FORMAT_VERSION or fmt.get("vision") != "clip_vit_l":
        raise UserError(f"{path!r} is a blip2_ray export of format {fmt or 'unknown'}; this version reads format "
                        f"{{'version': {FORMAT_VERSION}, 'vision': 'clip_vit_l'}}")


def mirrored_hf_config(path: str, data: dict):
    """(HF class, its config) of a directory in this format, the config built with the stand-in vision config."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2ForImageTextRetrieval,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
    )

    _check_format(path, data)
    classes = {c.__name__: (c, cfg) for c, cfg in ((Blip2ForImageTextRetrieval, Blip2Config),
                                                   (Blip2ForConditionalGeneration, Blip2Config),
                                                   (InstructBlipForConditionalGeneration, InstructBlipConfig))}
    name = next((a for a in data.get("architectures") or [] if a in classes), None)
    if name is None:
        raise UserError(f"{path!r}: config.json names no architecture this project exports "
                        f"({', '.join(classes)}); the directory is damaged")
    cls, config_cls = classes[name]
    fields = {k: v for k, v in data.items() if k not in ("model_type", "architectures", "blip2_ray_format",
                                                            "transformers_version")}
    fields["vision_config"] = stand_in_vision_config(data["vision_config"])
    return cls, config_cls(**fields)


def vision_fields(data: dict) -> dict:
    """The `model.vision` section (kind and sizes) of a directory in this format."""
    v = data["vision_config"]
    return {"kind": "clip_vit_l", "hidden_size": v["hidden_size"], "intermediate_size": v["intermediate_size"],
            "num_layers": v["num_hidden_layers"], "num_heads": v["num_attention_heads"],
            "image_size": v["image_size"], "patch_size": v["patch_size"], "layer_norm_eps": v["layer_norm_eps"],
            "ln_vision_eps": v.get("ln_vision_eps")}


def is_tied(key: str) -> bool:
    """A key an export leaves out because it shares its tensor with another (an LLM's output head)."""
    return key.endswith("lm_head.weight") or key.endswith("embed_tokens.weight") or key.endswith("wte.weight")


def native_key_shapes(hf_shapes: dict[str, tuple[int, ...]], model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every key the export holds, with its shape: the mirrored HF class's (`hf_shapes`, from a model built on
    meta) with the HF ViT's keys replaced by the model's CLIP tower's (`vision_model.` + its own names)."""
    from blip2_ray.model.partitioned import full_shape

    shapes = {k: v for k, v in hf_shapes.items() if not k.startswith("vision_model.")}
    for k, t in model.vision_model.state_dict(keep_vars=True).items():
        shapes[f"vision_model.{k}"] = full_shape(t)
    return shapes


def load_native_hf(path: str, data: dict, vision_dtype: torch.dtype, llm_dtype: torch.dtype) -> nn.Module:
    """The mirrored HF model (Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration) of a
    directory in this format, its `vision_model` a ClipVisionTower: the LLM read in `llm_dtype`, the ViT trunk
    in `vision_dtype`, the queries, Q-Former, projection and ln_vision in float32. Every key must fit."""
    cls, config = mirrored_hf_config(path, data)
    with parameters_on_meta():
        hf = cls(config)
    hf.vision_model = meta_copy_of_fields(vision_fields(data))
    # the dtypes the tensors are read in (meta: nothing is allocated yet)
    hf.language_model.to(llm_dtype)
    for name, p in hf.vision_model.named_parameters():
        if not name.startswith("post_layernorm."):
            p.data = p.data.to(vision_dtype)
    files = TensorFiles(path)
    own = hf.state_dict(keep_vars=True)
    required = [k for k in dict.fromkeys(own) if not is_tied(k)]
    label = f"model {path!r}"
    state = {k: files.get(k, own[k].dtype if k in own else None) for k in files.keys()}
    assign_weights(hf, state, label, required=required)
    hf.tie_weights()
    require_materialized(hf, label)
    return hf
