"""What fine-tuning changes in the stage models: the ViT trunk trains (float32 masters, gradient
checkpointing, drop path) and its blocks get layer-wise decayed learning rates. Ray-free.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from blip2_ray.errors import UserError
from blip2_ray.model.retrieval_finetune import Blip2RetrievalFinetune
from blip2_ray.model.stage1 import Blip2Stage1
from blip2_ray.model.vision import resize_vision_input, unfreeze_vision, vit_blocks
from blip2_ray.train.finetune_config import FinetuneConfig
from blip2_ray.weights.builders import is_stage2_dir_config
from blip2_ray.weights.local_files import read_json
from blip2_ray.weights.tokenizer_paths import qformer_tokenizer_dir
from blip2_ray.weights.weight_sources import INSTRUCTBLIP_MODEL_TYPE

_BLOCK = re.compile(r"^vision_model\.(?:clip\.)?encoder\.layers\.(\d+)\.")
_EMBEDDINGS = re.compile(r"^vision_model\.(?:clip\.)?(embeddings|pre_layrnorm)\.")


def question_encoder_source(cfg: FinetuneConfig) -> str:
    """vqa / instruct: where the question-aware Q-Former's text path comes from (vqa.question_encoder_from /
    instruct.qformer_text_from, else a stage-1 model.init_from); UserError naming the key when there is none."""
    key, value = question_encoder_key(cfg)
    if value:
        return value
    init = cfg.model.init_from
    if init and not (os.path.isdir(init) and is_stage2_dir_config(config_json(init))):
        return init  # a stage-1 export or LAVIS stage-1 .pth the stage-2 parts start from
    raise UserError(f"task {cfg.task} feeds the {'question' if cfg.task == 'vqa' else 'instruction'} to the Q-Former, "
                    f"whose text embeddings and text FFNs a BLIP-2 stage-2 model no longer has; set {key} to the "
                    f"stage-1 export it was trained from, a Blip2ForImageTextRetrieval directory "
                    f"(Salesforce/blip2-itm-vit-g), a LAVIS stage-1 .pth or bert-base-uncased")


def question_encoder_key(cfg: FinetuneConfig) -> tuple[str, str | None]:
    """(the config key naming the text path's source, its value) of the config's task."""
    if cfg.task == "instruct":
        return "instruct.qformer_text_from", cfg.instruct.qformer_text_from
    return "vqa.question_encoder_from", cfg.vqa.question_encoder_from


def starts_question_aware(cfg: FinetuneConfig) -> bool:
    """The starting model already reads questions (model.hf_path is a VQA export, InstructBLIP layout)."""
    return bool(cfg.model.hf_path) and config_json(cfg.model.hf_path).get("model_type") == INSTRUCTBLIP_MODEL_TYPE


def question_tokenizer_dir(cfg: FinetuneConfig) -> str:
    """vqa: the tokenizer of the question-aware Q-Former's text (the one its word embeddings were trained with)."""
    if starts_question_aware(cfg):
        return os.path.join(cfg.model.hf_path, "qformer_tokenizer")
    source = question_encoder_source(cfg)
    if os.path.isdir(source) and any(os.path.isfile(os.path.join(source, f)) for f in ("vocab.txt", "tokenizer.json")):
        return source
    return qformer_tokenizer_dir(cfg.model)  # a LAVIS .pth: the configured Q-Former tokenizer (bert-base-uncased)


def config_json(path: str) -> dict:
    """The config.json of a model directory ({} when there is none)."""
    f = os.path.join(path, "config.json")
    return read_json(Path(f), "model config") if os.path.isfile(f) else {}


def finetune_model(model: nn.Module, cfg: FinetuneConfig) -> None:
    """Apply `cfg.vision_training` to a freshly built stage model, in place (the LLM stays frozen); a stage-1
    model becomes a Blip2RetrievalFinetune (same parameters, a step that takes image ids). What a task adds
    (VQA's question-aware Q-Former) is its TaskSpec's (train/tasks/)."""
    if isinstance(model, Blip2Stage1):
        model.__class__ = Blip2RetrievalFinetune  # a subclass with no state of its own: only forward/train differ
    vt = cfg.vision_training
    # a whole BLIP-2 directory (model.hf_path) arrives at its own image size: fine-tuning at a larger one
    # (LAVIS: 364 px) resamples its position embeddings here, once; builders already do it for init_from
    resize_vision_input(model.vision_model, cfg.model.vision.image_size)
    if not vt.freeze_vit:
        unfreeze_vision(model.vision_model, vt.grad_checkpointing, vt.drop_path)
    lora = cfg.llm_lora
    if lora.enabled:  # only the adapters of the LLM train (model/llm_lora.py)
        from blip2_ray.model.llm_lora import add_llm_lora

        add_llm_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)


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
