"""The HF BLIP-2 configs of our models (`Blip2Config` for stage 2, `Blip2ForImageTextRetrieval`'s for stage 1, the
vision config a CLIP ViT-L stands in for), and an HF model built around a state dict without a second copy."""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from blip2_ray.errors import UserError
from blip2_ray.model.partitioned import full_shape
from blip2_ray.model.stage1 import Blip2Stage1
from blip2_ray.model.stage2 import Blip2Stage2
from blip2_ray.weights.native_format import (
    is_clip_vision,
    is_tied,
    meta_copy,
    stand_in_vision_config,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- HF configs
def _vision_hf_config(model: nn.Module) -> dict:
    """The ViT's HF config as a dict, with `ln_vision_eps` recorded when it is not the ViT's own eps (a CLIP
    ViT-L: a Blip2VisionConfig of its sizes, which native_format replaces by the CLIP config in config.json)."""
    from transformers import Blip2VisionModel

    vision = model.vision_model
    if is_clip_vision(vision):
        data = {**vision.config.to_dict(), "ln_vision_eps": vision.post_layernorm.eps}
        return stand_in_vision_config(data)
    if not isinstance(vision, Blip2VisionModel):
        raise UserError(f"the image encoder {type(vision).__name__} has no export format")
    data = vision.config.to_dict()
    data.pop("ln_vision_eps", None)
    eps = vision.post_layernorm.eps
    if eps != vision.config.layer_norm_eps:
        data["ln_vision_eps"] = eps
        log.warning("exporting ln_vision eps %g (ViT layer_norm_eps %g): our loaders use it; transformers' "
                    "post_layernorm uses %g, so its outputs differ slightly (docs/checkpoints.md)",
                    eps, vision.config.layer_norm_eps, vision.config.layer_norm_eps)
    return data


def stage2_hf_class(model: Blip2Stage2):
    """The HF class of a stage-2 export: Blip2ForConditionalGeneration, or, for a question-aware (VQA)
    Q-Former, InstructBlipForConditionalGeneration (the HF class whose Q-Former reads text next to the queries)."""
    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    return InstructBlipForConditionalGeneration if model.takes_question else Blip2ForConditionalGeneration


def stage2_hf_config(model: Blip2Stage2, image_token_index: int, vocab_rows: int | None = None):
    """The HF config of a stage-2 export; `vocab_rows`: the LLM's vocabulary grown for the <image> token."""
    from transformers import Blip2Config, InstructBlipConfig

    cls = InstructBlipConfig if model.takes_question else Blip2Config
    text = model.language_model.config.to_dict()  # the LLM's own config (any decoder family, T5)
    if vocab_rows is not None:
        text["vocab_size"] = vocab_rows
    return cls(
        vision_config=_vision_hf_config(model),
        qformer_config=model.qformer.config.to_dict(),
        text_config=text,
        num_query_tokens=model.num_query_tokens,
        image_token_index=image_token_index,
    )


def stage1_hf_config(model: Blip2Stage1):
    from transformers import Blip2Config, OPTConfig

    return Blip2Config(
        vision_config=_vision_hf_config(model),
        qformer_config=model.qformer.config.to_dict(),
        text_config=OPTConfig().to_dict(),  # unused by the retrieval model; HF's config requires one
        num_query_tokens=full_shape(model.query_tokens)[1],
        image_text_hidden_size=model.vision_projection.out_features,
        image_token_index=None,
    )


@contextlib.contextmanager
def quiet_save():
    """transformers' "Writing model shards" progress bar off (a job's log gets one line per export, its own)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _hf_from_state(cls, config, state: dict[str, torch.Tensor], vision_model: nn.Module | None = None):
    """An HF model holding `state` without allocating a second copy (meta init + assign). A CLIP ViT-L
    `vision_model` (our own format) takes the place of the HF ViT."""
    with torch.device("meta"):
        hf = cls(config)
        if vision_model is not None and is_clip_vision(vision_model):
            hf.vision_model = meta_copy(vision_model)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _is_tied(k)]
    if missing or unexpected:
        raise RuntimeError(f"state does not match {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.tie_weights()
    return hf


_is_tied = is_tied
