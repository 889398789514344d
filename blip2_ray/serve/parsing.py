"""HTTP request parsing and the error contract of the Serve API.

Every answer that is not a 2xx is `{"error": {"message", "type"}}`: 400 malformed body or image, 401
missing/wrong token, 403 image URL outside the allow-list, 404 endpoint whose model is absent, 413
body or image over the limits, 422 schema violation, 503 queue full or replica unavailable (with
`Retry-After`); 500 only for a bug (logged with its traceback).
"""

from __future__ import annotations

import base64
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("ray.serve")


class APIError(Exception):
    """An error answered as `{"error": {"message", "type"}}` with HTTP `status`; a 503 also says when to
    retry (`Retry-After`, seconds: `retry_after_s`, default 1)."""

    def __init__(self, status: int, type_: str, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.retry_after_s = retry_after_s if retry_after_s is not None else (1 if status == 503 else None)


def error_response(status: int, type_: str, message: str, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return JSONResponse({"error": {"message": message, "type": type_}}, status_code=status, headers=headers)


def install_error_handlers(api: FastAPI) -> None:
    """Route every exception the app can raise to the JSON error contract."""

    @api.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e.status, e.type, e.message, e.retry_after_s)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return error_response(422, "invalid_request_error", first_error(e.errors()))

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        types = {404: "not_found", 405: "method_not_allowed"}
        return error_response(e.status_code, types.get(e.status_code, "invalid_request_error"), str(e.detail))

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return error_response(500, "server_error", f"internal error ({e.__class__.__name__})")


def first_error(errors: list) -> str:
    """Pydantic's first validation error as 'field.path: message'."""
    if not errors:
        return "the request does not match the schema"
    e = errors[0]
    loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
    return f"{loc or 'body'}: {e.get('msg', 'invalid')}"


def check_headers(request: Request, token: str | None, max_body_bytes: int) -> None:
    """Auth and the declared body size, checked before the body is read (401 / 400 / 413)."""
    if token and request.headers.get("authorization", "") != f"Bearer {token}":
        raise APIError(401, "authentication_error",
                       "missing or wrong API token: send the header 'Authorization: Bearer <token>'")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise APIError(400, "invalid_request_error", "the Content-Length header is not a number")
        if int(length) > max_body_bytes:
            raise APIError(413, "request_too_large",
                           f"the request body ({length} bytes) is over the limit of {max_body_bytes} bytes")


def parse_multipart(content_type: str, body: bytes) -> dict:
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
        return parse_multipart(content_type, body)
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
    """`model` built from `data`; 422 naming the first bad field, 400 for a body nested too deeply."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise APIError(422, "invalid_request_error", first_error(e.errors())) from None
    except RecursionError:
        raise APIError(400, "invalid_request_error", "the request body is nested too deeply") from None
