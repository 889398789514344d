"""Caption cleaning, image checks and augmentations (no Ray)."""

import io

import numpy as np
import pytest
from PIL import Image

from blip2_ray.config import ConfigError, from_dict
from blip2_ray.data import transforms as T
from blip2_ray.data.config import DataConfig
from blip2_ray.fixtures.sample import _bomb_png


def _jpeg(w, h, colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_clean_caption_follows_recipe():
    assert T.clean_caption('A "Red" Circle!!  on (the) table; #1 ~ok.') == "a red circle on the table 1 ok"
    assert T.clean_caption(" ".join(["w"] * 80), max_words=50) == " ".join(["w"] * 50)
    assert T.clean_caption(" ... !! ") == ""


def test_pick_caption_reasons_and_multi_caption_draws():
    rng = np.random.default_rng(0)
    for raw, reason in [(None, T.MISSING_CAPTION), (b"  ..  ", T.EMPTY_CAPTION),
                        (b"a \xff\xfe b", T.BAD_CAPTION_ENCODING)]:
        with pytest.raises(T.SkipRecord) as e:
            T.pick_caption(raw, rng)
        assert e.value.reason == reason
    raw = b'["a red circle", "a photo of a red circle"]'
    drawn = {T.pick_caption(raw, np.random.default_rng(i)) for i in range(20)}
    assert drawn == {"a red circle", "a photo of a red circle"}
    assert T.pick_caption(b"[photo] A cat", rng) == "[photo] a cat"  # not JSON: kept as text


@pytest.mark.parametrize("data,reason", [
    (b"", T.MISSING_IMAGE),
    (b"not an image at all" * 10, T.UNDECODABLE_IMAGE),
    (_jpeg(64, 64)[:300], T.UNDECODABLE_IMAGE),  # truncated
    (_jpeg(8, 64), T.IMAGE_TOO_SMALL),
    (_bomb_png(), T.IMAGE_TOO_LARGE),
])
def test_decode_image_rejects(data, reason):
    with pytest.raises(T.SkipRecord) as e:
        T.decode_image(data, min_side=16, max_pixels=10_000_000)
    assert e.value.reason == reason


def test_decode_image_max_pixels_from_config_and_rgb():
    with pytest.raises(T.SkipRecord) as e:
        T.decode_image(_jpeg(100, 100), min_side=16, max_pixels=99 * 100)
    assert e.value.reason == T.IMAGE_TOO_LARGE
    buf = io.BytesIO()
    Image.new("L", (40, 30), 128).save(buf, format="PNG")
    im = T.decode_image(buf.getvalue(), min_side=16, max_pixels=10_000)
    assert im.mode == "RGB" and im.size == (40, 30)


def test_random_resized_crop_box_scale_and_bounds():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = T.random_resized_crop_box(256, 192, rng, (0.5, 1.0))
        assert 0 <= left < right <= 256 and 0 <= top < bottom <= 192
        assert (right - left) * (bottom - top) >= 0.5 * 256 * 192 * 0.95  # rounding slack
        assert 3 / 4 * 0.95 <= (right - left) / (bottom - top) <= 4 / 3 * 1.05


def test_train_and_eval_transforms_shape_norm_and_determinism():
    im = Image.new("RGB", (80, 60), (255, 255, 255))
    x = T.train_transform(im, 32, np.random.default_rng(1))
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x[:, 5, 5], (1.0 - T.CLIP_MEAN) / T.CLIP_STD, rtol=1e-5)
    y = T.eval_transform(im, 24)
    assert y.shape == (3, 24, 24)
    # same seed, same crop and flip; a left/right split image shows the flip
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[:, :32] = 255
    half = Image.fromarray(arr)
    outs = [T.train_transform(half, 16, np.random.default_rng(s)) for s in range(12)]
    np.testing.assert_array_equal(outs[0], T.train_transform(half, 16, np.random.default_rng(0)))
    left_bright = {bool(o[0, :, 0].mean() > o[0, :, -1].mean()) for o in outs}
    assert left_bright == {True, False}


def test_data_config_validation():
    cfg = from_dict(DataConfig, {"train": ["a", "b"], "weights": [1, 3]})
    assert cfg.weights == [1.0, 3.0] and cfg.image_keys[0] == "jpg" and cfg.caption_keys == ["txt", "caption"]
    for bad in [{"train": ["a"], "weights": [1, 2]}, {"image_size": 0}, {"min_crop_scale": 1.5},
                {"weights": [0.0], "train": ["a"]}, {"shuffle_buffer": -1}]:
        with pytest.raises(ConfigError):
            from_dict(DataConfig, bad)


def test_uint8_transport_and_device_normalisation_match_the_float_transform():
    """Rows carry uint8 pixels, TrainCollate keeps them uint8, and the device-side CLIP normalisation gives
    exactly eval_transform's floats (the host lookup table) for every byte value of every channel."""
    import torch

    from blip2_ray.data.pipeline import TrainCollate
    from blip2_ray.data.transforms import (
        CLIP_MEAN,
        CLIP_STD,
        eval_resize,
        eval_transform,
        normalize_pixels,
        normalize_pixels_tensor,
    )

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    raw = eval_resize(im, 32)
    assert raw.dtype == np.uint8 and raw.shape == (3, 32, 32)
    batch = {"pixel_values": raw[None], "key": np.array(["k"], dtype=object),
             "visit": np.array([3]), "record": np.array([7])}
    collated = TrainCollate()(batch)
    assert collated["pixel_values"].dtype == torch.uint8
    assert collated["visit"].tolist() == [3] and collated["record"].tolist() == [7] and collated["key"] == ["k"]
    out = normalize_pixels_tensor(collated["pixel_values"]).numpy()[0]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, eval_transform(im, 32))
    # and it is the CLIP normalisation written out
    expected = ((raw.astype(np.float32) / 255.0 - np.asarray(CLIP_MEAN)[:, None, None])
                / np.asarray(CLIP_STD)[:, None, None])
    np.testing.assert_allclose(out, expected, atol=1e-5)
    every = np.broadcast_to(np.arange(256, dtype=np.uint8), (2, 3, 4, 256)).copy()  # (B, 3, H, W)
    np.testing.assert_array_equal(normalize_pixels_tensor(torch.from_numpy(every)).numpy(), normalize_pixels(every))


@pytest.mark.gpu
def test_device_normalisation_on_cuda_is_exact():
    import torch

    from blip2_ray.data.transforms import normalize_pixels, normalize_pixels_tensor

    every = np.broadcast_to(np.arange(256, dtype=np.uint8), (2, 3, 4, 256)).copy()
    on_gpu = normalize_pixels_tensor(torch.from_numpy(every).cuda()).cpu().numpy()
    np.testing.assert_array_equal(on_gpu, normalize_pixels(every))


def test_data_config_checks_output_block_size():
    assert from_dict(DataConfig, {}).output_block_mib == 8.0
    with pytest.raises(ConfigError, match="output_block_mib must be > 0"):
        from_dict(DataConfig, {"output_block_mib": 0})
