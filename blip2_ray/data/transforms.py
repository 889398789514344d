"""Per-record work, Ray-free: caption cleaning, image decode with validation, resize / crop, normalisation.

Every check returns a skip reason instead of raising, so one bad record never stops a stream. The image half of
the project's preprocessing (data/processor.py composes it with the text half from a config): the one decoder
(`decode_image`), the one resize and crop, the one pixel normaliser (`PixelNormalizer`, CLIP's constants).
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings

import numpy as np
from PIL import Image

# CLIP's normalisation, BLIP-2's for EVA ViT-g and CLIP ViT-L alike (its image processor, the exports' too)
CLIP_NORMALIZATION = {"image_mean": (0.48145466, 0.4578275, 0.40821073),
                      "image_std": (0.26862954, 0.26130258, 0.27577711)}
CLIP_MEAN = np.array(CLIP_NORMALIZATION["image_mean"], dtype=np.float32)
CLIP_STD = np.array(CLIP_NORMALIZATION["image_std"], dtype=np.float32)

# Skip reasons (the keys of the skip counts).
UNDECODABLE_IMAGE = "undecodable_image"
IMAGE_TOO_SMALL = "image_too_small"
IMAGE_TOO_LARGE = "image_too_large"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
BAD_CAPTION_ENCODING = "bad_caption_encoding"
TRUNCATED_SHARD = "truncated_shard"
EMPTY_SHARD = "empty_shard"

_PUNCT = re.compile(r'[.!"()*#:;~]')
_SPACES = re.compile(r"\s+")


class SkipRecord(Exception):
    """A record that must be dropped; `reason` is one of the skip reasons above, `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def clean_caption(text: str, max_words: int = 50) -> str:
    """The BLIP-2 recipe: lower-case, `.!"()*#:;~` -> space, collapse spaces, cut to `max_words` words."""
    text = _SPACES.sub(" ", _PUNCT.sub(" ", text.lower())).strip()
    return " ".join(text.split(" ")[:max_words]) if text else ""


def caption_choices(raw: bytes | str | None) -> list[str]:
    """The captions a record holds: raw bytes/str, a JSON list of strings (CapFilt output) or None."""
    if raw is None:
        raise SkipRecord(MISSING_CAPTION)
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise SkipRecord(BAD_CAPTION_ENCODING) from None
    text = raw.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if isinstance(parsed, list) and parsed and all(isinstance(c, str) for c in parsed):
            return parsed
    return [raw]


def draw_choice(raw: bytes | str | None, rng: np.random.Generator) -> str:
    """One of the texts a record holds (caption_choices), drawn with `rng` when it holds several."""
    choices = caption_choices(raw)
    return choices[int(rng.integers(len(choices)))] if len(choices) > 1 else choices[0]


def pick_caption(raw: bytes | str | None, rng: np.random.Generator, max_words: int = 50) -> str:
    """One cleaned caption of a record (drawn with `rng` when it holds several); SkipRecord if none."""
    text = clean_caption(draw_choice(raw, rng), max_words)
    if not text:
        raise SkipRecord(EMPTY_CAPTION)
    return text


def decode_image(data: bytes | None, min_side: int, max_pixels: int) -> Image.Image:
    """Bytes -> RGB PIL image (the first frame), checking the header size before the pixels are decoded.

    The one image decoder of the project (the data pipeline, CapFilt, evaluation and the Serve ingress).
    """
    if data is None or len(data) == 0:
        raise SkipRecord(MISSING_IMAGE, "the image is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels is the limit
            im = Image.open(io.BytesIO(data))
            w, h = im.size  # from the header: no pixels decoded yet
            if w * h > max_pixels:
                raise SkipRecord(IMAGE_TOO_LARGE, f"the image has {w}x{h} pixels, over the limit of {max_pixels}")
            if min(w, h) < min_side:
                raise SkipRecord(IMAGE_TOO_SMALL, f"the image is {w}x{h}, under the minimum side of {min_side}")
            return im.convert("RGB")  # decodes; a truncated file raises OSError here
    except Image.DecompressionBombError:
        raise SkipRecord(IMAGE_TOO_LARGE, f"the image is over the limit of {max_pixels} pixels") from None
    except SkipRecord:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...) for bad bytes
        raise SkipRecord(UNDECODABLE_IMAGE, f"the image could not be decoded ({e.__class__.__name__})") from None


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params as a PIL box (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    # fallback: central crop with the ratio clamped
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def to_chw_uint8(im: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 (3, H, W): what travels through Ray's object store (4x less than float32)."""
    return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1))


class PixelNormalizer:
    """uint8 RGB (..., 3, H, W) -> float32 (..., 3, H, W): (v * rescale - mean[c]) / std[c], the one normaliser.

    The rescale in float64 then float32, the rest in float32, as transformers' image processors compute it (for
    1/255 that is float32 v / 255 exactly); tabulated once for the 256 byte values, so the host (numpy) and any
    torch device give identical values. CLIP's mean and std by default; Serve builds one from a model
    directory's saved image processor (`of_image_processor`).
    """

    def __init__(self, mean=CLIP_MEAN, std=CLIP_STD, rescale: float | None = 1 / 255):
        values = np.arange(256, dtype=np.float64)
        values = (values * rescale if rescale is not None else values).astype(np.float32)[None, :]
        mean, std = np.asarray(mean, np.float32)[:, None], np.asarray(std, np.float32)[:, None]
        self.table = np.ascontiguousarray((values - mean) / std, dtype=np.float32)  # (3, 256)
        self._on_device: dict = {}

    @classmethod
    def of_image_processor(cls, p) -> PixelNormalizer:
        """The normalisation a transformers image processor (BlipImageProcessor, ...) applies after resizing."""
        mean, std = (p.image_mean, p.image_std) if p.do_normalize else ((0.0,) * 3, (1.0,) * 3)
        return cls(mean, std, p.rescale_factor if p.do_rescale else None)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """On the host: uint8 numpy -> float32 numpy (a lookup per channel)."""
        pixels = np.asarray(pixels)
        out = np.empty(pixels.shape, np.float32)
        for c in range(3):
            np.take(self.table[c], pixels[..., c, :, :], out=out[..., c, :, :])
        return out

    def on_device(self, pixels):
        """On the tensor's device: uint8 torch (..., 3, H, W) -> float32 there, after the 4x smaller copy."""
        import torch

        table = self._on_device.get(pixels.device)
        if table is None:
            table = self._on_device[pixels.device] = torch.from_numpy(self.table).reshape(-1).to(pixels.device)
        offsets = torch.arange(0, 3 * 256, 256, device=pixels.device).view(3, 1, 1)
        return table[pixels.long() + offsets]


CLIP = PixelNormalizer()


def normalize_pixels(pixels: np.ndarray) -> np.ndarray:
    """uint8 (..., 3, H, W) RGB -> float32 (..., 3, H, W) with CLIP mean/std, on the host."""
    return CLIP(pixels)


def normalize_pixels_tensor(pixels):
    """uint8 torch tensor (..., 3, H, W) RGB on any device -> float32 on that device with CLIP mean/std.

    The values of `normalize_pixels`; it runs where the model does, after the 4x smaller uint8 copy to the device.
    """
    return CLIP.on_device(pixels)


def resize(im: Image.Image, size: tuple[int, int], resample=Image.Resampling.BICUBIC) -> np.ndarray:
    """Resize to (width, height) -> uint8 (3, H, W): the eval resize, and Serve's of a saved image processor."""
    return to_chw_uint8(im if im.size == tuple(size) else im.resize(tuple(size), resample))


def train_crop(im: Image.Image, size: int, rng: np.random.Generator, min_scale: float = 0.5) -> np.ndarray:
    """RandomResizedCrop(size, scale=(min_scale, 1), bicubic) + horizontal flip (p=0.5) -> uint8 (3, S, S)."""
    box = random_resized_crop_box(im.width, im.height, rng, (min_scale, 1.0))
    out = im.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_chw_uint8(out)


def eval_resize(im: Image.Image, size: int) -> np.ndarray:
    """Resize((size, size), bicubic) -> uint8 (3, S, S), as the reference eval processor does."""
    return resize(im, (size, size))


def train_transform(im: Image.Image, size: int, rng: np.random.Generator, min_scale: float = 0.5) -> np.ndarray:
    """train_crop + CLIP norm -> float32 (3, S, S)."""
    return normalize_pixels(train_crop(im, size, rng, min_scale))


def eval_transform(im: Image.Image, size: int) -> np.ndarray:
    """eval_resize + CLIP norm -> float32 (3, S, S)."""
    return normalize_pixels(eval_resize(im, size))
