"""Request schemas of the Serve API (pydantic) and their OpenAPI documentation.

The project's own endpoints refuse unknown fields; the OpenAI chat request accepts and ignores the
OpenAI fields it does not use, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CaptionRequest(_Strict):
    image: str = Field(description="base64 image bytes or a data: URL (or a multipart file field 'image')")
    model: str | None = Field(None, description="the served model to use (GET /v1/models); another name is a 404")
    prompt: str | None = Field(None, description="text the caption continues, e.g. 'a photo of'")
    max_new_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int | None = Field(None, ge=0)
    num_beams: int | None = Field(None, ge=1, description="1: greedy")


class VQARequest(_Strict):
    image: str
    model: str | None = Field(None, description="the served model to use (GET /v1/models); another name is a 404")
    question: str = Field(min_length=1)
    max_new_tokens: int | None = Field(None, ge=1)
    min_new_tokens: int | None = Field(None, ge=0)
    num_beams: int | None = Field(None, ge=1)


class EmbeddingsRequest(_Strict):
    """Images or texts (or OpenAI's `input`: one text or a list of texts) -> normalised ITC features."""

    images: list[str] | None = Field(None, min_length=1, description="base64 images or data: URLs")
    texts: list[str] | None = Field(None, min_length=1)
    input: str | list[str] | None = Field(None, description="OpenAI's field: a text or a list of texts (as 'texts')")
    model: str | None = Field(None, description="the served model to use (GET /v1/models); another name is a 404")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="OpenAI's: 'base64' sends each embedding as base64 of little-endian float32")
    dimensions: int | None = Field(None, ge=1, description="OpenAI's: must be the model's embedding size if given")
    user: str | None = Field(None, description="OpenAI's end-user id (ignored)")


class MatchRequest(_Strict):
    image: str
    texts: list[str] = Field(min_length=1)
    model: str | None = Field(None, description="the served model to use (GET /v1/models); another name is a 404")


class SearchRequest(_Strict):
    text: str | None = Field(None, description="find images matching this text (re-ranked by ITM + ITC)")
    image: str | None = Field(None, description="or find images like this one (base64 / data: URL, or a "
                                                "multipart file field 'image'; ITC image-image)")
    k: int | None = Field(None, description="images to return (default and maximum: the server's search section)")
    candidates: int | None = Field(None, description="text: ITC candidates re-ranked by ITM (k'; default 128)")
    rerank: bool = Field(True, description="text: re-rank the candidates by ITM + ITC (false: ITC order alone)")


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


class StreamOptions(BaseModel):
    include_usage: bool | None = Field(
        None, description="also send OpenAI's usage-only chunk (choices: []) before [DONE]; the finish chunk "
                          "carries usage either way")


class ChatCompletionRequest(BaseModel):
    """The OpenAI chat-completions subset; unknown OpenAI fields are accepted and ignored."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    seed: int | None = Field(None, description="sampling (temperature > 0): the same seed gives the same answer")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="only 1 is supported")


# ---------------------------------------------------------------- OpenAPI documentation
# The routes read their bodies themselves (JSON or multipart, with the API's own errors), so FastAPI
# cannot see the schemas; they are registered here and added to the generated OpenAPI document.
OPENAPI_SCHEMAS: dict[str, dict] = {}


def body_doc(model: type[BaseModel], multipart: bool = True) -> dict:
    """`openapi_extra` of a route whose body is `model` (as JSON, and as multipart/form-data)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    OPENAPI_SCHEMAS.update(schema.pop("$defs", {}))
    OPENAPI_SCHEMAS[model.__name__] = schema
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {"application/json": {"schema": ref}}
    if multipart:
        content["multipart/form-data"] = {"schema": ref}
    return {"requestBody": {"required": True, "content": content}}
