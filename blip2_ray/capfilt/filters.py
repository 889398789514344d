"""The models that rank CapFilt's candidate captions: BLIP-2's ITC (stage 1), or CLIP (the paper's).

A filter scores each image against its own candidates (web and synthetic captions together) and says
how many candidates it had to truncate to its text limit (a caption longer than the limit is scored
on its first tokens, counted, never an error):

- `blip2_itc`: a stage-1 export / Blip2ForImageTextRetrieval directory; ITC similarity = the max over
  the query embeddings of (query . text) (the ITC of training), text cut at `data.qformer_max_len`.
- `clip`: transformers' CLIPModel + its CLIPProcessor (the layout of openai/clip-vit-large-patch14);
  the score is CLIPModel's own `logits_per_image` (logit_scale x cosine of the projected embeddings),
  text cut at CLIP's 77 tokens (its position embeddings), images resized and centre-cropped by the processor.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from blip2_ray.capfilt.config import FilterConfig
from blip2_ray.capfilt.model_dirs import BLIP2_DIR_TYPES, HubLayout, model_name, require_model
from blip2_ray.runtime.compute import device_and_dtype


class CaptionFilter(Protocol):
    provenance: dict  # {"kind": filter.kind, "model": the model directory's name}

    def score(self, images: list, candidates: list[list[str]]) -> tuple[list[np.ndarray], int]:
        """(per image a float32 (N_i,) score of each of its N_i candidates, captions truncated to the limit)."""
        ...


def rank_captions(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """(Q, E) one image's query features x (N, E) candidate captions -> (N,) ITC similarity (max over Q)."""
    return (text_feats.float() @ image_feats.float().t()).amax(dim=1)


def count_truncated(tokenizer, texts: list[str], limit: int) -> int:
    """How many of `texts` the tokenizer makes longer than `limit` tokens (special tokens included)."""
    if not texts:
        return 0
    return sum(len(ids) > limit for ids in tokenizer(texts, truncation=False)["input_ids"])


class Blip2ItcFilter:
    """BLIP-2 stage 1's image-text contrastive similarity (a stage-1 export or Blip2ForImageTextRetrieval)."""

    kind = "blip2_itc"

    @staticmethod
    def check(path: str, what: str = "filter.model") -> None:
        """UserError unless `path` is a complete local directory of this kind (config, weights, processor)."""
        require_model(path, what, "filter.kind", "blip2_itc", BLIP2_DIR_TYPES, ("Blip2ForImageTextRetrieval",),
                      {"tokenizer": ("tokenizer.json", "vocab.txt", "tokenizer_config.json")})

    def __init__(self, cfg: FilterConfig, text_max_len: int = 32):
        # the only call into the stage-1 loaders (blip2_ray.model): adapt here when its signature moves
        from blip2_ray.weights.hf_format import load_stage1

        self.device, dtype = device_and_dtype(cfg.dtype)
        dtype = getattr(torch, dtype)
        self.model, self.tokenizer = load_stage1(cfg.model, vision_dtype=dtype)
        self.model.to(self.device).eval()
        self.image_size = self.model.vision_model.config.image_size
        self.text_max_len = text_max_len
        self.provenance = {"kind": self.kind, "model": model_name(cfg.model)}

    @torch.no_grad()
    def score(self, images: list, candidates: list[list[str]]) -> tuple[list[np.ndarray], int]:
        from blip2_ray.data.processor import tokenize_qformer
        from blip2_ray.data.transforms import eval_transform

        px = torch.from_numpy(np.stack([eval_transform(im, self.image_size) for im in images])).to(self.device)
        image_feats = self.model.image_feats(self.model.encode_image(px))  # (B, Q, E)
        flat = [c for cs in candidates for c in cs]
        enc = tokenize_qformer(self.tokenizer, flat, self.text_max_len)
        text_feats = self.model.text_feat(torch.from_numpy(enc["qformer_input_ids"]).to(self.device),
                                          torch.from_numpy(enc["qformer_attention_mask"]).to(self.device))
        out, start = [], 0
        for b, cs in enumerate(candidates):
            out.append(rank_captions(image_feats[b], text_feats[start:start + len(cs)]).cpu().numpy())
            start += len(cs)
        return out, count_truncated(self.tokenizer, flat, self.text_max_len)


class ClipFilter:
    """transformers' CLIPModel + CLIPProcessor (e.g. CLIP ViT-L/14): CLIP's image-text similarity."""

    kind = "clip"
    check = HubLayout("filter.kind", "clip", "clip", ("CLIPModel",), ("tokenizer.json", "vocab.json"), "CLIPProcessor",
                      49408, "CLIP text encoder").check

    def __init__(self, cfg: FilterConfig):
        from transformers import CLIPModel, CLIPProcessor

        self.device, dtype = device_and_dtype(cfg.dtype)
        dtype = getattr(torch, dtype)
        self.processor = CLIPProcessor.from_pretrained(cfg.model, local_files_only=True)
        self.model = CLIPModel.from_pretrained(cfg.model, local_files_only=True, dtype=dtype).to(self.device).eval()
        # the text limit is the model's position embeddings (77 for OpenAI's CLIP), whatever the tokenizer says
        self.text_max_len = min(self.model.config.text_config.max_position_embeddings,
                                self.processor.tokenizer.model_max_length)
        self.provenance = {"kind": self.kind, "model": model_name(cfg.model)}

    @torch.no_grad()
    def score(self, images: list, candidates: list[list[str]]) -> tuple[list[np.ndarray], int]:
        flat = [c for cs in candidates for c in cs]
        inputs = self.processor(images=images, text=flat, padding=True, truncation=True,
                                max_length=self.text_max_len, return_tensors="pt")
        out = self.model(input_ids=inputs["input_ids"].to(self.device),
                         attention_mask=inputs["attention_mask"].to(self.device),
                         pixel_values=inputs["pixel_values"].to(self.device, self.model.dtype))
        logits = out.logits_per_image  # (B, all candidates of all images): each image keeps its own block
        scores, start = [], 0
        for b, cs in enumerate(candidates):
            scores.append(logits[b, start:start + len(cs)].float().cpu().numpy())
            start += len(cs)
        return scores, count_truncated(self.processor.tokenizer, flat, self.text_max_len)


FILTERS = {"blip2_itc": Blip2ItcFilter, "clip": ClipFilter}


def check_filter(cfg: FilterConfig) -> None:
    """UserError (before any actor starts) if `cfg.model` is not a complete directory of `cfg.kind`."""
    FILTERS[cfg.kind].check(cfg.model)


def build_filter(cfg: FilterConfig, text_max_len: int = 32) -> CaptionFilter:
    """The filter of `cfg.kind` on its device (`text_max_len`: the blip2_itc text length, data.qformer_max_len)."""
    if cfg.kind == "blip2_itc":
        return Blip2ItcFilter(cfg, text_max_len)
    return ClipFilter(cfg)
