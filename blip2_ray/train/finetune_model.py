"""What fine-tuning changes in the stage models: the ViT trunk trains (float32 masters, gradient
checkpointing, drop path) and its blocks get layer-wise decayed learning rates. Ray-free.
"""

from __future__ import annotations

import re
import zlib
from typing import Callable

import torch
from torch import nn

from blip2_ray.model.retrieval_finetune import Blip2RetrievalFinetune
from blip2_ray.model.stage1 import Blip2Stage1
from blip2_ray.model.vision import resize_vision_input, unfreeze_vision, vit_blocks
from blip2_ray.train.finetune_config import FinetuneConfig

_BLOCK = re.compile(r"^vision_model\.(?:clip\.)?encoder\.layers\.(\d+)\.")
_EMBEDDINGS = re.compile(r"^vision_model\.(?:clip\.)?(embeddings|pre_layrnorm)\.")


def finetune_model(model: nn.Module, cfg: FinetuneConfig) -> None:
    """Apply `cfg.vision_training` to a freshly built stage model, in place (the LLM stays frozen); a stage-1
    model becomes a Blip2RetrievalFinetune (same parameters, a step that takes image ids)."""
    if isinstance(model, Blip2Stage1):
        model.__class__ = Blip2RetrievalFinetune  # a subclass with no state of its own: only forward/train differ
    vt = cfg.vision_training
    # a whole BLIP-2 directory (model.hf_path) arrives at its own image size: fine-tuning at a larger one
    # (LAVIS: 364 px) resamples its position embeddings here, once; builders already do it for init_from
    resize_vision_input(model.vision_model, cfg.model.vision.image_size)
    if not vt.freeze_vit:
        unfreeze_vision(model.vision_model, vt.grad_checkpointing, vt.drop_path)


def vit_lr_scale(model: nn.Module, cfg: FinetuneConfig) -> Callable[[str], float] | None:
    """Parameter name -> lr multiplier of layer-wise decay d over L blocks (BEiT/EVA's rule, as LAVIS fine-tunes
    ViT-g): block i gets d^(L - i), the patch/position embeddings d^(L + 1), all else (ln_vision, Q-Former) 1.
    None when the ViT is frozen or d is 1."""
    vt = cfg.vision_training
    if vt.freeze_vit or vt.layer_decay == 1.0:
        return None
    n, d = len(vit_blocks(model.vision_model)), vt.layer_decay

    def scale(name: str) -> float:
        m = _BLOCK.match(name)
        if m:
            return d ** (n - int(m.group(1)))
        return d ** (n + 1) if _EMBEDDINGS.match(name) else 1.0

    return scale


def vit_training_gib(num_params: int, num_workers: int, zero_stage: int) -> float:
    """GiB per worker for the trainable ViT's float32 weights, gradients and AdamW moments under ZeRO-2/3."""
    weights = 4 * num_params / (num_workers if zero_stage == 3 else 1)
    grads_and_adam = (4 + 8) * num_params / num_workers
    return (weights + grads_and_adam) / (1 << 30)


def image_ids_of_keys(keys) -> torch.Tensor:
    """(B,) int64 ids of the images of training rows keyed "<image_id>/<n>" (data/annotations.py)."""
    return torch.tensor([zlib.crc32(str(k).rsplit("/", 1)[0].encode()) for k in keys], dtype=torch.int64)
