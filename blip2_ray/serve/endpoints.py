"""What each model route of the ingress starts with: its `Endpoint` (path, request schema, the deployment that
serves it, where its images and texts are), the checked request (`Prepared`), and the small helpers of the
routes' answers (embedding sizes, vector encodings)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from blip2_ray.serve import chat
from blip2_ray.serve.parsing import APIError
from blip2_ray.serve.protocol import (
    CaptionRequest,
    ChatCompletionRequest,
    EmbeddingsRequest,
    MatchRequest,
    SearchRequest,
    VQARequest,
)


# ---------------------------------------------------------------- what each model route starts with
@dataclass(frozen=True)
class Endpoint:
    """A model route's prologue, as data: its body schema, the deployment it needs, and where its
    generation settings, its text(s) and its images are in the request (None: the route has none)."""

    path: str
    schema: type[BaseModel]
    model: str  # "caption", "retrieval" or "search"
    images: Callable[[Any], list[str] | None]
    generation: Callable[[Any], tuple] | None = None  # req -> (max_new, min_new, beams, default key, temperature)
    text: Callable[[Any], tuple[str | None, str]] | None = None  # req -> (its text, the name errors give it)
    texts: Callable[[Any], list[str] | None] | None = None
    multipart: bool = True


def _embedding_images(req: EmbeddingsRequest) -> list[str] | None:
    if sum(x is not None for x in (req.images, req.texts, req.input)) != 1:
        raise APIError(422, "invalid_request_error", "give exactly one of 'images', 'texts' or 'input'")
    return req.images


def _embedding_texts(req: EmbeddingsRequest) -> list[str] | None:
    """'texts', or OpenAI's 'input' (one text or a list of texts)."""
    if req.input is not None:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise APIError(422, "invalid_request_error", "input: give at least one text")
        return texts
    return req.texts


CAPTION = Endpoint("/v1/caption", CaptionRequest, "caption", lambda r: [r.image],
                   lambda r: (r.max_new_tokens, r.min_new_tokens, r.num_beams, "max_new_tokens", 0.0),
                   text=lambda r: (r.prompt, "prompt"))
VQA = Endpoint("/v1/vqa", VQARequest, "caption", lambda r: [r.image],
               lambda r: (r.max_new_tokens, r.min_new_tokens, r.num_beams, "vqa_max_new_tokens", 0.0),
               text=lambda r: (r.question, "question"))
EMBEDDINGS = Endpoint("/v1/embeddings", EmbeddingsRequest, "retrieval", _embedding_images, texts=_embedding_texts)
MATCH = Endpoint("/v1/match", MatchRequest, "retrieval", lambda r: [r.image], texts=lambda r: r.texts)
CHAT = Endpoint("/v1/chat/completions", ChatCompletionRequest, "caption",
                lambda r: [chat.chat_image_and_text(r)[0]],
                lambda r: (r.max_completion_tokens or r.max_tokens, None, None, "max_new_tokens", r.temperature or 0.0),
                text=lambda r: (chat.chat_image_and_text(r)[1], "message text"), multipart=False)
SEARCH = Endpoint("/v1/search", SearchRequest, "search", lambda r: None if r.image is None else [r.image],
                  text=lambda r: (r.text, "text"))
FLAGS = {"caption": "--model DIR", "retrieval": "--retrieval-model DIR",
          "search": "--retrieval-model DIR --search-index INDEX_DIR"}
SERVES = {"caption": "caption, vqa, chat", "retrieval": "embeddings, match", "search": "search"}


def embedding_size(model_dir: str) -> int | None:
    """The ITC feature size of a retrieval model directory (its config.json's image_text_hidden_size)."""
    import json

    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f).get("image_text_hidden_size")
    except (OSError, ValueError):
        return None


def base64_floats(vector: np.ndarray) -> str:
    """OpenAI's base64 embedding: the little-endian float32 bytes, base64."""
    import base64

    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


ENCODINGS = {"float": lambda v: v.tolist(), "base64": base64_floats}


@dataclass
class Prepared:
    req: Any  # the validated request
    pixels: np.ndarray | None  # uint8 (B, 3, H, W), None if the request has no images
    settings: dict | None = None  # generation settings (caption routes)
    text: str = ""  # the prompt, question or chat text (checked for length)
    texts: list[str] | None = None  # retrieval texts (checked for count and length)
