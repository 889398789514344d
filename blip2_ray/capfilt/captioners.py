"""The models that write CapFilt's synthetic captions: a BLIP-2 stage-2 export, or BLIP (the paper's).

A captioner takes RGB PIL images and returns, per image, the K captions nucleus sampling drew (raw
decoded text; the worker cleans them). Each kind preprocesses images its own model's way:

- `blip2`: a stage-2 export / Blip2ForConditionalGeneration directory (ours or Salesforce's), images
  through the training pipeline's eval transform, the prompt (if any) continued by the LLM.
- `blip`: transformers' BlipForConditionalGeneration + its BlipProcessor (the layout of
  Salesforce/blip-image-captioning-large). BLIP's prompt convention: the processor's "[CLS] prompt [SEP]"
  becomes "[DEC] prompt" (HF's `generate` swaps in bos_token_id and drops the [SEP]), the decoder
  continues it and the prompt is cut off again unless `prepend_prompt`; no prompt is unconditional
  captioning from "[DEC]" alone. BLIP's own CapFilt used the prompt "a picture of " and cut it off.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from blip2_ray.capfilt.config import CaptionerConfig
from blip2_ray.capfilt.model_dirs import BLIP2_DIR_TYPES, HubLayout, model_name, require_model
from blip2_ray.runtime.compute import device_and_dtype


class Captioner(Protocol):
    provenance: dict  # {"kind": captioner.kind, "model": the model directory's name}

    def caption(self, images: list) -> list[list[str]]:
        """K sampled captions per image (K = num_captions), in the order the model drew them."""
        ...


def _sampling(cc: CaptionerConfig) -> dict:
    """The nucleus-sampling arguments of HF `generate`, the same for every kind."""
    return dict(do_sample=True, num_beams=1, top_p=cc.top_p, temperature=cc.temperature,
                repetition_penalty=cc.repetition_penalty, max_new_tokens=cc.max_new_tokens,
                min_new_tokens=cc.min_new_tokens, num_return_sequences=cc.num_captions)


def _per_image(texts: list[str], n_images: int, k: int) -> list[list[str]]:
    # HF returns the K samples of one image next to each other
    return [[t.strip() for t in texts[i * k:(i + 1) * k]] for i in range(n_images)]


class Blip2Captioner:
    """A BLIP-2 stage-2 model (Blip2ForConditionalGeneration directory) sampling K captions per image."""

    kind = "blip2"

    @staticmethod
    def check(path: str, what: str = "captioner.model") -> None:
        """UserError unless `path` is a complete local directory of this kind (config, weights, processor)."""
        require_model(path, what, "captioner.kind", "blip2", BLIP2_DIR_TYPES, ("Blip2ForConditionalGeneration",),
                      {"tokenizer": ("tokenizer.json", "tokenizer_config.json")})

    def __init__(self, cfg: CaptionerConfig):
        # the only calls into the stage-2 loaders (blip2_ray.model): adapt here when their signatures move
        from blip2_ray.weights.hf_format import load_stage2
        from blip2_ray.weights.tokenizers import load_llm_tokenizer

        self.cfg = cfg
        self.device, dtype = device_and_dtype(cfg.dtype)
        dtype = getattr(torch, dtype)
        self.model = load_stage2(cfg.model, vision_dtype=dtype, llm_dtype=dtype).to(self.device).eval()
        self.tokenizer = load_llm_tokenizer(cfg.model)
        self.image_size = self.model.vision_model.config.image_size
        self.provenance = {"kind": self.kind, "model": model_name(cfg.model)}

    @torch.no_grad()
    def caption(self, images: list) -> list[list[str]]:
        from blip2_ray.data.transforms import eval_transform
        from blip2_ray.model.prompts import generate_text

        cc = self.cfg
        px = torch.from_numpy(np.stack([eval_transform(im, self.image_size) for im in images]))
        px = px.to(self.device, self.model.query_tokens.dtype)
        texts = generate_text(self.model, self.tokenizer, px, [cc.prompt] if cc.prompt else None, **_sampling(cc))
        if cc.prompt and cc.prepend_prompt:
            texts = [f"{cc.prompt} {t}" for t in texts]
        return _per_image(texts, len(images), cc.num_captions)


class BlipCaptioner:
    """transformers' BlipForConditionalGeneration + BlipProcessor (e.g. BLIP-large) sampling K captions per image."""

    kind = "blip"
    check = HubLayout("captioner.kind", "blip", "blip", ("BlipForConditionalGeneration",),
                      ("tokenizer.json", "vocab.txt"), "BlipProcessor", 30524, "BLIP text decoder").check

    def __init__(self, cfg: CaptionerConfig):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.cfg = cfg
        self.device, dtype = device_and_dtype(cfg.dtype)
        dtype = getattr(torch, dtype)
        self.processor = BlipProcessor.from_pretrained(cfg.model, local_files_only=True)
        self.model = BlipForConditionalGeneration.from_pretrained(cfg.model, local_files_only=True, dtype=dtype)
        self.model.to(self.device).eval()
        self.provenance = {"kind": self.kind, "model": model_name(cfg.model)}

    @torch.no_grad()
    def caption(self, images: list) -> list[list[str]]:
        cc = self.cfg
        inputs = self.processor(images=images, text=[cc.prompt] * len(images) if cc.prompt else None,
                                return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.model.dtype)
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        out = self.model.generate(pixel_values=pixel_values, input_ids=None if ids is None else ids.to(self.device),
                                  attention_mask=None if mask is None else mask.to(self.device), **_sampling(cc))
        # `out` = [DEC] prompt tokens (the processor's ids without their [SEP]), then the sampled ones
        start = ids.shape[1] - 1 if cc.prompt and not cc.prepend_prompt else 0
        texts = self.processor.batch_decode(out[:, start:], skip_special_tokens=True)
        return _per_image(texts, len(images), cc.num_captions)


CAPTIONERS = {"blip2": Blip2Captioner, "blip": BlipCaptioner}


def check_captioner(cfg: CaptionerConfig) -> None:
    """UserError (before any actor starts) if `cfg.model` is not a complete directory of `cfg.kind`."""
    if cfg.num_captions > 0:
        CAPTIONERS[cfg.kind].check(cfg.model)


def build_captioner(cfg: CaptionerConfig) -> Captioner | None:
    """The captioner of `cfg.kind` on its device (None when num_captions is 0: filter the web captions only)."""
    return CAPTIONERS[cfg.kind](cfg) if cfg.num_captions > 0 else None
