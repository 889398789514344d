"""Request images -> model inputs: base64 / `data:` URL / allowed URL -> bounded PIL decode -> pixel values.

Every failure is an `APIError` with the status the API promises (400 undecodable, 413 too many pixels,
403 a URL outside the allow-list); nothing here raises anything else for bad input.
Preprocessing is the model directory's own saved image processor (resize bicubic, CLIP mean/std), so a
served caption sees exactly the pixels `Blip2Processor` would give it.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np


class APIError(Exception):
    """An error answered as `{"error": {"message", "type"}}` with HTTP `status`."""

    def __init__(self, status: int, type_: str, message: str):
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message


def _b64decode(data: str) -> bytes:
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "invalid_image", "the image is neither valid base64 nor a data: URL") from None


def image_bytes(value: str, allowed_prefixes: list[str], fetch_timeout_s: float = 5.0, max_bytes: int = 10_000_000) -> bytes:
    """The encoded image bytes of a request's image string (base64, `data:` URL or allow-listed URL)."""
    if not isinstance(value, str) or not value:
        raise APIError(400, "invalid_image", "the image is empty")
    if value.startswith("data:"):
        header, sep, payload = value.partition(",")
        if not sep:
            raise APIError(400, "invalid_image", "malformed data: URL (expected data:<mime>;base64,<data>)")
        if not header.endswith(";base64"):
            raise APIError(400, "invalid_image", "only base64 data: URLs are accepted (data:<mime>;base64,<data>)")
        return _b64decode(payload)
    if "://" in value[:16]:
        if not any(value.startswith(p) for p in allowed_prefixes):
            raise APIError(
                403, "image_url_not_allowed",
                "image URLs other than data: URLs are refused; send the image as base64, or configure "
                "allowed_image_url_prefixes on the server",
            )
        return _fetch(value, fetch_timeout_s, max_bytes)
    return _b64decode(value)


def _fetch(url: str, timeout_s: float, max_bytes: int) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=timeout_s, follow_redirects=False) as r:
            if r.status_code != 200:
                raise APIError(400, "invalid_image", f"fetching the image URL answered HTTP {r.status_code}")
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf.extend(chunk)
                if len(buf) > max_bytes:
                    raise APIError(413, "image_too_large", f"the image at the URL is over {max_bytes} bytes")
            return bytes(buf)
    except httpx.HTTPError as e:
        raise APIError(400, "invalid_image", f"could not fetch the image URL ({e.__class__.__name__})") from None


def decode_image(data: bytes, max_pixels: int):
    """Encoded bytes -> an RGB PIL image, refusing more than `max_pixels` before decoding the pixels."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size  # read from the header: nothing decoded yet
            if w * h > max_pixels:
                raise APIError(413, "image_too_large", f"the image has {w}x{h} pixels, over the limit of {max_pixels}")
            im.load()
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            return im.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(413, "image_too_large", f"the image is over the limit of {max_pixels} pixels") from None
    except Exception as e:  # PIL raises many types for corrupt input
        raise APIError(400, "invalid_image", f"the image could not be decoded ({e.__class__.__name__})") from None


class ImagePreprocessor:
    """The saved image processor of a model directory: PIL images -> (B, 3, H, W) float32 pixel values."""

    def __init__(self, model_dir: str):
        from transformers import BlipImageProcessor

        self.processor = BlipImageProcessor.from_pretrained(model_dir, local_files_only=True)

    def __call__(self, images: list) -> np.ndarray:
        try:
            out = self.processor(images=images, return_tensors="np")["pixel_values"]
        except Exception as e:
            raise APIError(400, "invalid_image", f"the image could not be preprocessed ({e.__class__.__name__})") from None
        return np.ascontiguousarray(out, dtype=np.float32)


def load_pixels(values: list[str], pre: ImagePreprocessor, *, max_pixels: int, allowed_prefixes: list[str],
                fetch_timeout_s: float, max_bytes: int) -> np.ndarray:
    """Request image strings -> (B, 3, H, W) float32 pixel values (raises APIError on any bad image)."""
    images = [decode_image(image_bytes(v, allowed_prefixes, fetch_timeout_s, max_bytes), max_pixels) for v in values]
    return pre(images)
