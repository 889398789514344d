"""The Serve application: a FastAPI ingress in front of the caption and retrieval model deployments.

    HTTP -> BLIP2Ingress (auth, body limits, JSON/multipart parsing, schema checks, image decode and
            preprocessing) -> CaptionDeployment (@serve.batch generate) / RetrievalDeployment

Every answer that is not a 2xx is `{"error": {"message", "type"}}`: 400 malformed body or image, 401
missing/wrong token, 403 image URL outside the allow-list, 404 endpoint whose model is absent, 413
body or image over the limits, 422 schema violation, 503 queue full or replica unavailable.
`build_app(cfg)` composes it; `app_builder(args)` is the `import_path` for `serve run`/`serve deploy`.
"""


import asyncio
import base64
import json
import logging
import os
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from blip2_ray.config import from_dict, to_dict
from blip2_ray.serve.config import ServeConfig
from blip2_ray.serve.images import APIError, ImagePreprocessor, load_pixels
from blip2_ray.serve.models import CaptionDeployment, RetrievalDeployment

logger = logging.getLogger("ray.serve")


# ---------------------------------------------------------------- request schemas
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CaptionRequest(_Strict):
    image: str = Field(description="base64 image bytes or a data: URL (or a multipart file field 'image')")
    prompt: str | None = Field(None, description="text the caption continues, e.g. 'a photo of'")
    max_new_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int | None = Field(None, ge=0)
    num_beams: int | None = Field(None, ge=1, description="1: greedy")


class VQARequest(_Strict):
    image: str
    question: str = Field(min_length=1)
    max_new_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int | None = Field(None, ge=0)
    num_beams: int | None = Field(None, ge=1)


class EmbeddingsRequest(_Strict):
    images: list[str] | None = Field(None, min_length=1, description="base64 images or data: URLs")
    texts: list[str] | None = Field(None, min_length=1)
    model: str | None = None


class MatchRequest(_Strict):
    image: str
    texts: list[str] = Field(min_length=1)


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat-completions subset; unknown OpenAI fields are accepted and ignored."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    stream: bool | None = False
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")


_SCHEMAS: dict[str, dict] = {}


def _register_schema(model: type[BaseModel]) -> dict:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    _SCHEMAS.update(schema.pop("$defs", {}))
    _SCHEMAS[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _body_doc(model: type[BaseModel], multipart: bool = True) -> dict:
    ref = _register_schema(model)
    content = {"application/json": {"schema": ref}}
    if multipart:
        content["multipart/form-data"] = {"schema": ref}
    return {"requestBody": {"required": True, "content": content}}


# ---------------------------------------------------------------- the FastAPI app
api = FastAPI(
    title="BLIP-2 on Ray Serve",
    version="1",
    description="Captioning, VQA, embeddings, image-text matching and an OpenAI-compatible chat endpoint.",
)


def error_response(status: int, type_: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_}}, status_code=status, headers=headers)


@api.exception_handler(APIError)
async def _api_error(request: Request, e: APIError):
    return error_response(e.status, e.type, e.message)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, e: RequestValidationError):
    return error_response(422, "invalid_request_error", _first_error(e.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, e: StarletteHTTPException):
    types = {404: "not_found", 405: "method_not_allowed"}
    return error_response(e.status_code, types.get(e.status_code, "invalid_request_error"), str(e.detail))


@api.exception_handler(Exception)
async def _unexpected(request: Request, e: Exception):
    logger.exception("unexpected error on %s", request.url.path)
    return error_response(500, "server_error", f"internal error ({e.__class__.__name__})")


def _custom_openapi():
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_SCHEMAS)
        api.openapi_schema = schema
    return api.openapi_schema


api.openapi = _custom_openapi


def _first_error(errors: list) -> str:
    if not errors:
        return "the request does not match the schema"
    e = errors[0]
    loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
    return f"{loc or 'body'}: {e.get('msg', 'invalid')}"


def _parse_multipart(content_type: str, body: bytes) -> dict:
    """multipart/form-data -> a dict like the JSON body: file fields become base64 strings."""
    from email import policy
    from email.parser import BytesParser

    try:
        msg = BytesParser(policy=policy.HTTP).parsebytes(
            b"MIME-Version: 1.0\r\nContent-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
        )
        if not msg.is_multipart():
            raise ValueError("not multipart")
        fields: dict[str, list] = {}
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if not name:
                continue
            payload = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                value = base64.b64encode(payload).decode("ascii")
            else:
                value = payload.decode("utf-8", "replace")
            fields.setdefault(str(name), []).append(value)
    except Exception:
        raise APIError(400, "invalid_request_error", "the multipart/form-data body could not be parsed") from None
    return {k: (v if k in ("images", "texts") else v[0]) for k, v in fields.items()}


async def read_payload(request: Request, max_bytes: int, multipart: bool = True) -> dict:
    """The request body as a dict (JSON object or multipart form); 400/413/422 on a bad body."""
    body = await request.body()
    if len(body) > max_bytes:
        raise APIError(413, "request_too_large", f"the request body is over the limit of {max_bytes} bytes")
    content_type = request.headers.get("content-type", "")
    if multipart and content_type.lower().startswith("multipart/form-data"):
        return _parse_multipart(content_type, body)
    if not body:
        raise APIError(400, "invalid_request_error", "the request body is empty: send a JSON object")
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise APIError(400, "invalid_request_error", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(422, "invalid_request_error", "the request body must be a JSON object")
    return data


def validate(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise APIError(422, "invalid_request_error", _first_error(e.errors())) from None
    except RecursionError:
        raise APIError(400, "invalid_request_error", "the request body is nested too deeply") from None


# ---------------------------------------------------------------- the ingress deployment
@serve.deployment
@serve.ingress(api)
class BLIP2Ingress:
    def __init__(self, cfg: dict, captioner=None, retrieval=None, api_token: str | None = None):
        self.cfg = from_dict(ServeConfig, cfg)
        self.captioner = captioner
        self.retrieval = retrieval
        self.name = self.cfg.served_model_name
        self.token = api_token or os.environ.get(self.cfg.api_token_env) or None
        self.caption_pre = ImagePreprocessor(self.cfg.model) if self.cfg.model else None
        self.retrieval_pre = ImagePreprocessor(self.cfg.retrieval_model) if self.cfg.retrieval_model else None
        self.llm_kind = None
        if self.cfg.model:
            from transformers import Blip2Config

            hf = Blip2Config.from_pretrained(self.cfg.model, local_files_only=True)
            self.llm_kind = "decoder" if hf.use_decoder_only_language_model else "t5"

    # ---- helpers
    def _guard(self, request: Request) -> None:
        """Auth and the declared body size, checked before the body is read.

        (In the handlers, not a middleware: Serve pickles the ingress class by value, so module state a
        middleware could read is not the replica's.)
        """
        if self.token and request.headers.get("authorization", "") != f"Bearer {self.token}":
            raise APIError(401, "authentication_error",
                           "missing or wrong API token: send the header 'Authorization: Bearer <token>'")
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise APIError(400, "invalid_request_error", "the Content-Length header is not a number")
            if int(length) > self.cfg.max_body_bytes:
                raise APIError(413, "request_too_large",
                               f"the request body ({length} bytes) is over the limit of {self.cfg.max_body_bytes} bytes")

    def _need(self, handle, endpoint: str, flag: str):
        if handle is None:
            raise APIError(404, "model_not_loaded",
                           f"{endpoint} needs a model this server was started without: start it with {flag}")

    async def _payload(self, request: Request, model: type[BaseModel]):
        return validate(model, await read_payload(request, self.cfg.max_body_bytes))

    async def _pixels(self, images: list[str], pre: ImagePreprocessor):
        c = self.cfg
        return await asyncio.to_thread(
            load_pixels, images, pre, max_pixels=c.max_image_pixels, allowed_prefixes=c.allowed_image_url_prefixes,
            fetch_timeout_s=c.image_fetch_timeout_s, max_bytes=c.max_body_bytes,
        )

    def _settings(self, max_new: int | None, min_new: int | None, beams: int | None, default_max: int,
                  temperature: float = 0.0) -> dict:
        g = self.cfg.generation
        max_new = default_max if max_new is None else max_new
        min_new = min(g.min_new_tokens, max_new) if min_new is None else min_new
        beams = g.num_beams if beams is None else beams
        if max_new > g.max_new_tokens_limit:
            raise APIError(422, "invalid_request_error", f"max_new_tokens: at most {g.max_new_tokens_limit}")
        if min_new > max_new:
            raise APIError(422, "invalid_request_error", "min_new_tokens: must not exceed max_new_tokens")
        if beams > g.max_num_beams:
            raise APIError(422, "invalid_request_error", f"num_beams: at most {g.max_num_beams}")
        return {"max_new_tokens": max_new, "min_new_tokens": min_new, "num_beams": beams,
                "temperature": float(temperature)}

    def _text(self, text: str | None, what: str) -> str:
        if text is not None and len(text) > self.cfg.max_prompt_chars:
            raise APIError(422, "invalid_request_error", f"{what}: longer than {self.cfg.max_prompt_chars} characters")
        return text or ""

    async def _call(self, response):
        """Await a DeploymentResponse, mapping a full queue or a dead replica to 503."""
        import ray
        from ray.serve.exceptions import BackPressureError

        try:
            return await response
        except BackPressureError:
            raise APIError(503, "overloaded", "the server's queue is full; retry later") from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise APIError(503, "unavailable", f"a model replica is restarting ({e.__class__.__name__}); retry") from None

    async def _generate(self, pixel_values, prompt: str, settings: dict) -> dict:
        out = await self._call(self.captioner.generate.remote({"pixel_values": pixel_values, "prompt": prompt, **settings}))
        if "error" in out:
            raise APIError(*out["error"])
        return out

    @staticmethod
    def _batch_headers(out: dict) -> dict:
        return {"x-batch-size": str(out["batch_size"]), "x-generate-group-size": str(out["group_size"])}

    # ---- routes
    @api.get("/healthz")
    async def healthz(self):
        return {"status": "ok", "caption_model": self.captioner is not None, "retrieval_model": self.retrieval is not None}

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._guard(request)
        data = [{"id": self.name, "object": "model", "created": 0, "owned_by": "blip2_ray"}]
        return {"object": "list", "data": data}

    @api.post("/v1/caption", openapi_extra=_body_doc(CaptionRequest))
    async def caption(self, request: Request):
        self._guard(request)
        self._need(self.captioner, "/v1/caption", "--model DIR")
        req = await self._payload(request, CaptionRequest)
        settings = self._settings(req.max_new_tokens, req.min_new_tokens, req.num_beams, self.cfg.generation.max_new_tokens)
        prompt = self._text(req.prompt, "prompt")
        pixels = await self._pixels([req.image], self.caption_pre)
        out = await self._generate(pixels[0], prompt, settings)
        return JSONResponse({"caption": out["text"], "model": self.name}, headers=self._batch_headers(out))

    @api.post("/v1/vqa", openapi_extra=_body_doc(VQARequest))
    async def vqa(self, request: Request):
        from blip2_ray.model.stage2 import vqa_prompt

        self._guard(request)
        self._need(self.captioner, "/v1/vqa", "--model DIR")
        req = await self._payload(request, VQARequest)
        settings = self._settings(req.max_new_tokens, req.min_new_tokens, req.num_beams, self.cfg.generation.vqa_max_new_tokens)
        prompt = vqa_prompt(self._text(req.question, "question"), self.llm_kind)
        pixels = await self._pixels([req.image], self.caption_pre)
        out = await self._generate(pixels[0], prompt, settings)
        return JSONResponse({"answer": out["text"], "model": self.name}, headers=self._batch_headers(out))

    @api.post("/v1/embeddings", openapi_extra=_body_doc(EmbeddingsRequest))
    async def embeddings(self, request: Request):
        self._guard(request)
        self._need(self.retrieval, "/v1/embeddings", "--retrieval-model DIR")
        req = await self._payload(request, EmbeddingsRequest)
        if (req.images is None) == (req.texts is None):
            raise APIError(422, "invalid_request_error", "give exactly one of 'images' or 'texts'")
        if req.images is not None:
            if len(req.images) > self.cfg.max_images_per_request:
                raise APIError(413, "request_too_large", f"images: at most {self.cfg.max_images_per_request} per request")
            pixels = await self._pixels(req.images, self.retrieval_pre)
            out = await self._call(self.retrieval.embed_images.remote(pixels))
            data = [{"object": "embedding", "index": i, "embedding": out["pooled"][i].tolist(),
                     "query_embeddings": out["queries"][i].tolist()} for i in range(len(req.images))]
        else:
            texts = [self._text(t, f"texts[{i}]") for i, t in enumerate(req.texts)]
            if len(texts) > self.cfg.max_texts_per_request:
                raise APIError(413, "request_too_large", f"texts: at most {self.cfg.max_texts_per_request} per request")
            feats = await self._call(self.retrieval.embed_texts.remote(texts))
            data = [{"object": "embedding", "index": i, "embedding": f.tolist()} for i, f in enumerate(feats)]
        return {"object": "list", "data": data, "model": self.name}

    @api.post("/v1/match", openapi_extra=_body_doc(MatchRequest))
    async def match(self, request: Request):
        self._guard(request)
        self._need(self.retrieval, "/v1/match", "--retrieval-model DIR")
        req = await self._payload(request, MatchRequest)
        texts = [self._text(t, f"texts[{i}]") for i, t in enumerate(req.texts)]
        if len(texts) > self.cfg.max_texts_per_request:
            raise APIError(413, "request_too_large", f"texts: at most {self.cfg.max_texts_per_request} per request")
        pixels = await self._pixels([req.image], self.retrieval_pre)
        out = await self._call(self.retrieval.match.remote(pixels, texts))
        data = [{"text": t, "itm": float(out["itm"][i]), "itc": float(out["itc"][i])} for i, t in enumerate(texts)]
        return {"data": data, "model": self.name}

    @api.post("/v1/chat/completions", openapi_extra=_body_doc(ChatCompletionRequest, multipart=False))
    async def chat_completions(self, request: Request):
        """One image (a data: URL part) + the last user message's text. A text ending in '?' is asked
        with the recipe's VQA prompt; other text is the prompt the answer continues."""
        from blip2_ray.model.stage2 import vqa_prompt

        self._guard(request)
        self._need(self.captioner, "/v1/chat/completions", "--model DIR")
        data = await read_payload(request, self.cfg.max_body_bytes, multipart=False)
        req = validate(ChatCompletionRequest, data)
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
        text = self._text(text, "message text")
        prompt = vqa_prompt(text, self.llm_kind) if text.endswith("?") else text
        max_tokens = req.max_completion_tokens or req.max_tokens
        temperature = req.temperature or 0.0
        settings = self._settings(max_tokens, None, None, self.cfg.generation.max_new_tokens, temperature)
        if temperature > 0:
            settings["num_beams"] = 1
        pixels = await self._pixels([image], self.caption_pre)
        out = await self._generate(pixels[0], prompt, settings)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                 "total_tokens": out["prompt_tokens"] + out["completion_tokens"]}
        headers = self._batch_headers(out)
        if req.stream:
            return StreamingResponse(self._stream(cid, created, out, usage), media_type="text/event-stream", headers=headers)
        body = {"id": cid, "object": "chat.completion", "created": created, "model": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "finish_reason": out["finish_reason"], "logprobs": None}],
                "usage": usage}
        return JSONResponse(body, headers=headers)

    async def _stream(self, cid: str, created: int, out: dict, usage: dict):
        """Server-sent events: the whole answer arrives in one content chunk (generation is batched)."""

        def chunk(delta: dict, finish: str | None) -> str:
            c = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            return f"data: {json.dumps(c)}\n\n"

        yield chunk({"role": "assistant", "content": ""}, None)
        yield chunk({"content": out["text"]}, None)
        yield chunk({}, out["finish_reason"])
        yield "data: [DONE]\n\n"


# ---------------------------------------------------------------- composition
def _model_options(cfg: ServeConfig) -> dict:
    actor = {"num_cpus": cfg.cpus_per_replica}
    if cfg.device == "cuda":
        actor["num_gpus"] = cfg.gpus_per_replica
    opts: dict[str, Any] = dict(
        max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
        ray_actor_options=actor, health_check_timeout_s=cfg.health_check_timeout_s,
    )
    if cfg.autoscaling is not None:
        a = cfg.autoscaling
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "target_ongoing_requests": a.target_ongoing_requests}
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def build_app(cfg: ServeConfig, name_prefix: str = ""):
    """The Serve application for `cfg`: ingress + the model deployments whose directories are given."""
    opts = _model_options(cfg)
    captioner = retrieval = None
    if cfg.model:
        captioner = serve.deployment(CaptionDeployment).options(name=f"{name_prefix}CaptionDeployment", **opts).bind(
            cfg.model, cfg.device, cfg.dtype, cfg.max_batch_size, cfg.batch_wait_timeout_s
        )
    if cfg.retrieval_model:
        retrieval = serve.deployment(RetrievalDeployment).options(name=f"{name_prefix}RetrievalDeployment", **opts).bind(
            cfg.retrieval_model, cfg.device, cfg.dtype
        )
    # The token is read where the app is built and handed to the ingress replica (its own process).
    token = os.environ.get(cfg.api_token_env) or None
    return BLIP2Ingress.options(
        name=f"{name_prefix}BLIP2Ingress", max_ongoing_requests=cfg.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0}, health_check_timeout_s=cfg.health_check_timeout_s,
    ).bind(to_dict(cfg), captioner, retrieval, token)


def app_builder(args: dict):
    """`import_path: blip2_ray.serve.app:app_builder`; `args` is a ServeConfig mapping, checked strictly."""
    return build_app(from_dict(ServeConfig, dict(args or {})))


__all__ = ["build_app", "app_builder", "api", "BLIP2Ingress"]
