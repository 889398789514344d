"""Request images -> model inputs, split where the work belongs.

Ingress (CPU): base64 / `data:` URL / allowed URL -> bounded decode (`blip2_ray.data.transforms.
decode_image`, the project's one decoder) -> resize -> uint8 (3, H, W), 4x fewer bytes to ship than
float32. Model replica: uint8 -> normalised float32 on the replica's device.
Together they give exactly the pixels of the model directory's saved `BlipImageProcessor` (PIL backend):
the same PIL resize (data/transforms.resize), then the project's one normaliser (data/transforms.PixelNormalizer)
with the processor's rescale, mean and std: its own float64-rescale + float32-normalise for each of the 256 values.

Every failure is an `APIError` with the status the API promises (400 undecodable, 413 too many pixels,
403 a URL outside the allow-list); nothing here raises anything else for bad input.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from blip2_ray.data.transforms import IMAGE_TOO_LARGE, PixelNormalizer, SkipRecord, decode_image, resize, to_chw_uint8
from blip2_ray.serve.parsing import APIError


def _b64decode(data: str) -> bytes:
    try:
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "invalid_image", "the image is neither valid base64 nor a data: URL") from None


def image_bytes(value: str, allowed_prefixes: list[str], fetch_timeout_s: float = 5.0,
                max_bytes: int = 10_000_000) -> bytes:
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


def decode(data: bytes, max_pixels: int):
    """Encoded bytes -> an RGB PIL image; 413 over `max_pixels` (read from the header), 400 undecodable."""
    try:
        return decode_image(data, min_side=1, max_pixels=max_pixels)
    except SkipRecord as e:
        if e.reason == IMAGE_TOO_LARGE:
            raise APIError(413, "image_too_large", e.detail) from None
        raise APIError(400, "invalid_image", e.detail or "the image could not be decoded") from None


def _processor(model_dir: str):
    # the PIL backend explicitly: with torchvision installed `BlipImageProcessor` resizes with torch instead
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    return BlipImageProcessorPil.from_pretrained(model_dir, local_files_only=True)


class ImageResizer:
    """The ingress half of a model directory's saved image processor: PIL image -> uint8 (3, H, W)."""

    def __init__(self, model_dir: str):
        from PIL import Image

        p = _processor(model_dir)
        height, width = getattr(p.size, "height", None), getattr(p.size, "width", None)
        if not height or not width:
            raise ValueError(f"{model_dir}: only a fixed (height, width) image size is supported, not {p.size}")
        self.size = (int(width), int(height))
        self.resample = Image.Resampling(int(p.resample))
        self.do_resize = bool(p.do_resize)

    def __call__(self, image) -> np.ndarray:
        return resize(image, self.size, self.resample) if self.do_resize else to_chw_uint8(image)


def pixel_normalizer(model_dir: str, device="cpu"):
    """The replica half: uint8 (B, 3, H, W) numpy -> float32 (B, 3, H, W) torch on `device`, normalised as the
    model directory's saved image processor says (data/transforms.PixelNormalizer)."""
    import torch

    normalizer = PixelNormalizer.of_image_processor(_processor(model_dir))
    device = torch.device(device)

    def normalize(pixels: np.ndarray):
        if pixels.dtype != np.uint8:
            raise TypeError(f"expected uint8 pixels, got {pixels.dtype}")
        return normalizer.on_device(torch.from_numpy(np.ascontiguousarray(pixels)).to(device))  # uint8 crosses

    return normalize


def load_pixels(values: list[str], resize: ImageResizer, *, max_pixels: int, allowed_prefixes: list[str],
                fetch_timeout_s: float, max_bytes: int) -> np.ndarray:
    """Request image strings -> uint8 (B, 3, H, W) resized pixels (raises APIError on any bad image)."""
    images = [decode(image_bytes(v, allowed_prefixes, fetch_timeout_s, max_bytes), max_pixels) for v in values]
    return np.stack([resize(im) for im in images])
