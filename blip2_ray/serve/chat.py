"""The OpenAI chat-completions adaptation: messages -> (image, prompt), answers -> OpenAI bodies and SSE chunks.

One image (an `image_url` part) and the last user message's text. A text ending in '?' is asked with
the recipe's VQA prompt; other text is the prompt the answer continues.

Streaming (`"stream": true`): server-sent events, one `chat.completion.chunk` per piece of new text as
it is generated (greedy or sampled answers; a beam-search answer arrives as one piece at the end),
then a chunk with an empty delta, the `finish_reason` and `usage`, then `data: [DONE]`. With
`stream_options.include_usage` OpenAI's extra usage-only chunk (`choices: []`) comes before [DONE].
"""

from __future__ import annotations

import json

from blip2_ray.serve.parsing import APIError
from blip2_ray.serve.protocol import ChatCompletionRequest, ContentPart, ImageURL


def chat_image_and_text(req: ChatCompletionRequest) -> tuple[str, str]:
    """The image URL and the text of the last user message that has them (422 without an image)."""
    image, text = None, ""
    for m in req.messages:
        if m.role != "user":
            continue
        parts = [ContentPart(type="text", text=m.content)] if isinstance(m.content, str) else (m.content or [])
        texts = []
        for p in parts:
            if p.type == "image_url":
                url = p.image_url.url if isinstance(p.image_url, ImageURL) else p.image_url
                if not url:
                    raise APIError(422, "invalid_request_error", "an image_url part needs a url")
                image = url
            elif p.text:
                texts.append(p.text)
        text = " ".join(texts).strip()
    if image is None:
        raise APIError(422, "invalid_request_error", "the user messages need one image_url part (a data: URL)")
    return image, text


def is_question(text: str) -> bool:
    """A chat text ending in '?' is asked with the recipe's VQA prompt (worded by the caption replica)."""
    return text.endswith("?")


def usage(out: dict) -> dict:
    return {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
            "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}


def completion_body(cid: str, created: int, model: str, out: dict) -> dict:
    """The non-streaming `chat.completion` answer."""
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                         "finish_reason": out["finish_reason"], "logprobs": None}],
            "usage": usage(out)}


class ChunkWriter:
    """Server-sent events of one streamed completion."""

    def __init__(self, cid: str, created: int, model: str):
        self.head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def _event(self, body: dict) -> str:
        return f"data: {json.dumps({**self.head, **body})}\n\n"

    def delta(self, delta: dict, finish_reason: str | None = None, usage_: dict | None = None) -> str:
        body = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
        if usage_ is not None:
            body["usage"] = usage_
        return self._event(body)

    def usage_only(self, usage_: dict) -> str:
        return self._event({"choices": [], "usage": usage_})

    @staticmethod
    def error(status: int, type_: str, message: str) -> str:
        """A failure after the stream started (the status line is sent): an error event, then the end."""
        return f"data: {json.dumps({'error': {'message': message, 'type': type_, 'code': status}})}\n\n"

    @staticmethod
    def done() -> str:
        return "data: [DONE]\n\n"
