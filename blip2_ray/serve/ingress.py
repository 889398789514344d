"""The HTTP ingress: the FastAPI routes, each starting with one prologue that does all per-request CPU work.

Auth and body limits, JSON/multipart parsing, schema checks, generation settings and texts, then image
decode + resize to uint8 (see `images.py`): a request whose body or image is bad is answered here and
never reaches a model replica. The error contract is in `parsing.py`, the schemas in `protocol.py`,
the OpenAI adaptation in `chat.py`, each route's `Endpoint` in `endpoints.py`, the SSE stream in
`streaming.py`. Its replicas scale with the config's `ingress` section.
"""

# no `from __future__ import annotations` here: FastAPI must see the routes' real annotations (a string
# `Request` in a class Serve pickles by value resolves to nothing, and the route answers 422)
import asyncio
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from blip2_ray.config import from_dict
from blip2_ray.serve import chat
from blip2_ray.serve.config import ServeConfig
from blip2_ray.serve.endpoints import (
    CAPTION,
    CHAT,
    EMBEDDINGS,
    ENCODINGS,
    FLAGS,
    MATCH,
    SEARCH,
    SERVES,
    VQA,
    Endpoint,
    Prepared,
    embedding_size,
)
from blip2_ray.serve.images import ImageResizer, load_pixels
from blip2_ray.serve.parsing import APIError, check_headers, install_error_handlers, read_payload, validate
from blip2_ray.serve.protocol import (
    OPENAPI_SCHEMAS,
    body_doc,
)
from blip2_ray.serve.streaming import ServeStreamingResponse, sse_events

api = FastAPI(
    title="BLIP-2 on Ray Serve",
    version="1",
    description="Captioning, VQA, embeddings, image-text matching and an OpenAI-compatible chat endpoint.",
)
install_error_handlers(api)


def _custom_openapi():
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(OPENAPI_SCHEMAS)
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _custom_openapi


# ---------------------------------------------------------------- the ingress deployment
@serve.deployment
@serve.ingress(api)
class BLIP2Ingress:
    def __init__(self, cfg: dict, captioner=None, retrieval=None, api_token: str | None = None, search=None):
        self.cfg = from_dict(ServeConfig, cfg)
        self.handles = {"caption": captioner, "retrieval": retrieval, "search": search}
        # the name each model answers to: responses name the model that computed them
        self.names = {"caption": self.cfg.caption_model_name, "retrieval": self.cfg.retrieval_name,
                      "search": self.cfg.search.served_name if search is not None else None}
        self.embed_dim = embedding_size(self.cfg.retrieval_model) if self.cfg.retrieval_model else None
        self.token = api_token or os.environ.get(self.cfg.api_token_env) or None
        self.resizers = {"caption": ImageResizer(self.cfg.model) if self.cfg.model else None,
                         "retrieval": ImageResizer(self.cfg.retrieval_model) if self.cfg.retrieval_model else None}
        self.resizers["search"] = self.resizers["retrieval"]

    async def _prologue(self, request: Request, ep: Endpoint) -> Prepared:
        """Auth and size checks, the model the route needs (404), the parsed and validated body
        (400/413/422), its generation settings and texts (413/422), then its images decoded and resized
        (400/403/413): whatever fails, fails here, before any model replica is called.

        (In the handlers, not a middleware: Serve pickles the ingress class by value, so module state a
        middleware could read is not the replica's.)
        """
        check_headers(request, self.token, self.cfg.max_body_bytes)
        if self.handles[ep.model] is None:
            raise APIError(404, "model_not_loaded",
                           f"{ep.path} needs a model this server was started without: start it with {FLAGS[ep.model]}")
        req = validate(ep.schema, await read_payload(request, self.cfg.max_body_bytes, ep.multipart))
        self._check_model_name(ep, getattr(req, "model", None))
        p = Prepared(req, None, self._settings(*ep.generation(req)) if ep.generation else None)
        if ep.text:
            p.text = self._text(*ep.text(req))
        if ep.texts and (texts := ep.texts(req)) is not None:
            if len(texts) > self.cfg.max_texts_per_request:
                raise APIError(413, "request_too_large", f"texts: at most {self.cfg.max_texts_per_request} per request")
            p.texts = [self._text(t, f"texts[{i}]") for i, t in enumerate(texts)]
        images = ep.images(req)
        if images is not None:
            if len(images) > self.cfg.max_images_per_request:
                raise APIError(413, "request_too_large",
                               f"images: at most {self.cfg.max_images_per_request} per request")
            c = self.cfg
            p.pixels = await asyncio.to_thread(
                load_pixels, images, self.resizers[ep.model], max_pixels=c.max_image_pixels,
                allowed_prefixes=c.allowed_image_url_prefixes, fetch_timeout_s=c.image_fetch_timeout_s,
                max_bytes=c.max_body_bytes,
            )
        return p

    def _served(self) -> str:
        return ", ".join(f"{name} ({SERVES[kind]})" for kind, name in self.names.items() if name)

    def _check_model_name(self, ep: Endpoint, name: str | None) -> None:
        """A request naming a model must name the one that answers its route (404 listing the served ones)."""
        if name is None or name == self.names[ep.model]:
            return
        if name in self.names.values():
            raise APIError(404, "model_not_found", f"model {name!r} does not answer {ep.path}; served here: "
                                                   f"{self._served()}")
        raise APIError(404, "model_not_found", f"model {name!r} is not served here; served: {self._served()}")

    def _settings(self, max_new: int | None, min_new: int | None, beams: int | None, default_key: str,
                  temperature: float) -> dict:
        g = self.cfg.generation
        max_new = getattr(g, default_key) if max_new is None else max_new
        min_new = min(g.min_new_tokens, max_new) if min_new is None else min_new
        beams = g.num_beams if beams is None else beams
        if max_new > g.max_new_tokens_limit:
            raise APIError(422, "invalid_request_error", f"max_new_tokens: at most {g.max_new_tokens_limit}")
        if min_new > max_new:
            raise APIError(422, "invalid_request_error", "min_new_tokens: must not exceed max_new_tokens")
        if beams > g.max_num_beams:
            raise APIError(422, "invalid_request_error", f"num_beams: at most {g.max_num_beams}")
        if temperature > 0:
            beams = 1  # sampling: one sequence
        return {"max_new_tokens": max_new, "min_new_tokens": min_new, "num_beams": beams,
                "temperature": float(temperature)}

    def _text(self, text: str | None, what: str) -> str:
        if text is not None and len(text) > self.cfg.max_prompt_chars:
            raise APIError(422, "invalid_request_error", f"{what}: longer than {self.cfg.max_prompt_chars} characters")
        return text or ""

    @staticmethod
    async def _call(awaitable):
        """Await a deployment's answer, mapping a full queue or a dead replica to 503."""
        import ray
        from ray.serve.exceptions import BackPressureError

        try:
            return await awaitable
        except BackPressureError:
            raise APIError(503, "overloaded", "the server's queue is full; retry later") from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise APIError(503, "unavailable",
                           f"a model replica is restarting ({e.__class__.__name__}); retry") from None

    @staticmethod
    def _item(p: Prepared, question: bool) -> dict:
        """What the caption replica gets (it words a question with its own LLM's VQA prompt)."""
        return {"pixel_values": p.pixels[0], "prompt": p.text, "question": question, **p.settings,
                "seed": getattr(p.req, "seed", None)}

    async def _generate(self, p: Prepared, question: bool = False) -> dict:
        out = await self._call(self.handles["caption"].generate.remote(self._item(p, question)))
        if "error" in out:
            raise APIError(*out["error"])
        return out

    @staticmethod
    def _batch_headers(out: dict) -> dict:
        return {"x-batch-size": str(out["batch_size"]), "x-generate-group-size": str(out["group_size"])}

    # ---- routes
    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "caption_model": self.handles["caption"] is not None,
                "retrieval_model": self.handles["retrieval"] is not None,
                "search_index": self.handles["search"] is not None}

    @api.get("/v1/models")
    async def models(self, request: Request):
        check_headers(request, self.token, self.cfg.max_body_bytes)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "blip2_ray",
                 "endpoints": [f"/v1/{e}" for e in SERVES[kind].replace("chat", "chat/completions").split(", ")]}
                for kind, name in self.names.items() if name]
        return {"object": "list", "data": data}

    @api.post(CAPTION.path, openapi_extra=body_doc(CAPTION.schema))
    async def caption(self, request: Request):
        p = await self._prologue(request, CAPTION)
        out = await self._generate(p)
        return JSONResponse({"caption": out["text"], "model": self.names["caption"]}, headers=self._batch_headers(out))

    @api.post(VQA.path, openapi_extra=body_doc(VQA.schema))
    async def vqa(self, request: Request):
        p = await self._prologue(request, VQA)
        out = await self._generate(p, question=True)
        return JSONResponse({"answer": out["text"], "model": self.names["caption"]}, headers=self._batch_headers(out))

    @api.post(EMBEDDINGS.path, openapi_extra=body_doc(EMBEDDINGS.schema))
    async def embeddings(self, request: Request):
        p = await self._prologue(request, EMBEDDINGS)
        dims, encode = p.req.dimensions, ENCODINGS[p.req.encoding_format]
        if dims is not None and self.embed_dim is not None and dims != self.embed_dim:
            raise APIError(422, "invalid_request_error",
                           f"dimensions: this model's embeddings have {self.embed_dim} (they cannot be shortened)")
        if p.pixels is not None:
            out = await self._call(self.handles["retrieval"].embed_images.remote(p.pixels))
            data = [{"object": "embedding", "index": i, "embedding": encode(out["pooled"][i]),
                     "query_embeddings": out["queries"][i].tolist()} for i in range(len(p.pixels))]
            tokens = 0
        else:
            out = await self._call(self.handles["retrieval"].embed_texts.remote(p.texts))
            data = [{"object": "embedding", "index": i, "embedding": encode(f)} for i, f in enumerate(out["features"])]
            tokens = out["tokens"]
        return JSONResponse({"object": "list", "data": data, "model": self.names["retrieval"],
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}},
                            headers={"x-batch-size": str(out["batch_size"])})

    @api.post(MATCH.path, openapi_extra=body_doc(MATCH.schema))
    async def match(self, request: Request):
        p = await self._prologue(request, MATCH)
        out = await self._call(self.handles["retrieval"].match.remote(p.pixels, p.texts))
        data = [{"text": t, "itm": float(out["itm"][i]), "itc": float(out["itc"][i])} for i, t in enumerate(p.texts)]
        return JSONResponse({"data": data, "model": self.names["retrieval"]},
                            headers={"x-batch-size": str(out["batch_size"])})

    @api.post(SEARCH.path, openapi_extra=body_doc(SEARCH.schema))
    async def search(self, request: Request):
        """Text -> the top k images re-ranked by ITM + ITC; image -> the top k images by ITC image-image."""
        p = await self._prologue(request, SEARCH)
        r, s = p.req, self.cfg.search
        if (r.text is None) == (r.image is None):
            raise APIError(422, "invalid_request_error", "give exactly one of 'text' or 'image'")
        k = s.default_k if r.k is None else r.k
        if not 1 <= k <= s.max_k:
            raise APIError(422, "invalid_request_error", f"k: must be between 1 and {s.max_k}, got {k}")
        candidates = s.rerank_candidates if r.candidates is None else r.candidates
        if not 1 <= candidates <= s.max_candidates:
            raise APIError(422, "invalid_request_error",
                           f"candidates: must be between 1 and {s.max_candidates}, got {candidates}")
        handle = self.handles["search"]
        if r.text is not None:
            if not p.text.strip():
                raise APIError(422, "invalid_request_error", "text: the query is empty")
            out = await self._call(handle.search_text.remote(p.text, k, candidates, r.rerank))
            query = {"type": "text", "tokens": out["query_tokens"], "max_tokens": s.query_max_tokens,
                     "truncated": out["truncated"]}
            if out["truncated"]:
                query["note"] = (f"the query has {out['query_tokens']} tokens; the Q-Former reads the first "
                                 f"{s.query_max_tokens}, the rest was ignored")
            extra = {"reranked": r.rerank, "candidates": out["candidates"], "unreadable_candidates": out["unreadable"]}
        else:
            out = await self._call(handle.search_image.remote(p.pixels, k))
            query, extra = {"type": "image"}, {"reranked": False}
        names = self.names
        return JSONResponse({"object": "search", "model": names["search"], "retrieval_model": names["retrieval"],
                             "query": query,
                             **extra, "data": [{"rank": n + 1, **row} for n, row in enumerate(out["results"])]})

    @api.post(CHAT.path, openapi_extra=body_doc(CHAT.schema, multipart=False))
    async def chat_completions(self, request: Request):
        """One image + the last user message's text (see `chat.py`); `"stream": true` streams the tokens."""
        p = await self._prologue(request, CHAT)
        question = chat.is_question(p.text)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if p.req.stream:
            return await self._stream(p, question, chat.ChunkWriter(cid, created, self.names["caption"]))
        out = await self._generate(p, question)
        return JSONResponse(chat.completion_body(cid, created, self.names["caption"], out),
                            headers=self._batch_headers(out))

    async def _stream(self, p: Prepared, question: bool, writer: chat.ChunkWriter) -> StreamingResponse:
        parts = self.handles["caption"].options(stream=True).generate_stream.remote(self._item(p, question))
        try:
            first = await self._call(parts.__anext__())  # admitted (or refused): the status is known now
        except BaseException:
            parts.cancel()
            raise
        if "error" in first:
            parts.cancel()
            raise APIError(*first["error"])
        include_usage = bool(p.req.stream_options and p.req.stream_options.include_usage)
        headers = {"x-batch-size": str(first["batch_size"]), "x-generate-group-size": str(first["group_size"])}
        return ServeStreamingResponse(sse_events(first, parts, writer, include_usage),
                                      media_type="text/event-stream", headers=headers)
