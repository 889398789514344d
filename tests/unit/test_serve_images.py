"""Request images and bodies -> model inputs, and every bad input -> the right APIError (no Ray)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from blip2_ray.serve.images import decode, image_bytes
from blip2_ray.serve.parsing import APIError


def png(w=20, h=10, mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, format="PNG")
    return buf.getvalue()


def status(fn, *args):
    with pytest.raises(APIError) as e:
        fn(*args)
    return e.value.status


def test_base64_and_data_url():
    raw = png()
    assert image_bytes(base64.b64encode(raw).decode(), []) == raw
    assert image_bytes("data:image/png;base64," + base64.b64encode(raw).decode(), []) == raw


@pytest.mark.parametrize("value", ["", "%%%", "data:image/png,abc", "data:nocomma", "data:image/png;base64,@@"])
def test_bad_image_strings_are_400(value):
    assert status(image_bytes, value, []) == 400


def test_urls_refused_unless_allowed():
    assert status(image_bytes, "https://example.org/a.png", []) == 403
    assert status(image_bytes, "file:///etc/passwd", ["https://example.org/"]) == 403


def test_decode_modes_and_limits():
    for mode in ("RGB", "L", "RGBA", "P", "I;16"):
        assert decode(png(mode=mode), 1000).mode == "RGB"
    assert status(decode, png(40, 40), 1000) == 413
    assert status(decode, b"GIF89a garbage", 1000) == 400
    assert status(decode, png()[:40], 1000) == 400
    assert status(decode, b"", 1000) == 400


def test_resize_then_normalise_is_exactly_the_saved_processor(tmp_path):
    """uint8 from the ingress + the replica's lookup table == BlipImageProcessor's float32 output, bit for bit."""
    from PIL import Image

    from blip2_ray.serve.images import ImageResizer
    from blip2_ray.serve.images import pixel_normalizer as PixelNormalizer
    from blip2_ray.weights.hf_format import image_processor

    image_processor(32).save_pretrained(str(tmp_path))
    resize, normalise = ImageResizer(str(tmp_path)), PixelNormalizer(str(tmp_path))
    rng = np.random.RandomState(0)
    for h, w in [(30, 50), (32, 32), (300, 17)]:
        img = Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))
        small = resize(img)
        assert small.shape == (3, 32, 32) and small.dtype == np.uint8
        ours = normalise(small[None]).numpy()
        ref = image_processor(32)(images=img, return_tensors="np")["pixel_values"]
        assert ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref)
    with pytest.raises(TypeError):
        normalise(ours)  # float pixels are a bug upstream, not something to normalise twice


def test_multipart_parsing():
    from blip2_ray.serve.parsing import parse_multipart

    boundary = "XyZ"
    raw = png()
    body = (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
        f"Content-Type: image/png\r\n\r\n".encode() + raw + f"\r\n--{boundary}\r\n"
        f"Content-Disposition: form-data; name=\"texts\"\r\n\r\na dog\r\n--{boundary}\r\n"
        f"Content-Disposition: form-data; name=\"texts\"\r\n\r\na cat\r\n--{boundary}--\r\n".encode()
    )
    data = parse_multipart(f"multipart/form-data; boundary={boundary}", body)
    assert base64.b64decode(data["image"]) == raw and data["texts"] == ["a dog", "a cat"]
    with pytest.raises(APIError):
        parse_multipart("multipart/form-data", b"junk")
