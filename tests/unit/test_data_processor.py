"""One owner of preprocessing (data/processor.py, data/transforms.py): CLIP's constants once, one pixel
normaliser for the pipeline, evaluation, CapFilt and Serve, token lengths and prompts from the config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from blip2_ray.config import from_dict
from blip2_ray.data.config import DataConfig
from blip2_ray.data.processor import ImageTextProcessor, vqa_prompt, vqa_template
from blip2_ray.data.transforms import CLIP, PixelNormalizer, eval_transform, normalize_pixels

ROOT = Path(__file__).resolve().parents[2]


def test_clip_constants_are_defined_once_and_normalised_by_one_class():
    hits = subprocess.run(["grep", "-rln", "0.48145466", str(ROOT / "blip2_ray")], capture_output=True, text=True)
    assert [Path(p).relative_to(ROOT).as_posix() for p in hits.stdout.split()] == ["blip2_ray/data/transforms.py"]
    hits = subprocess.run(["grep", "-rn", "image_mean\\|image_std", str(ROOT / "blip2_ray")], capture_output=True,
                          text=True).stdout
    assert "serve/images.py" not in hits  # Serve reads them through PixelNormalizer.of_image_processor


def test_a_saved_image_processor_normalises_as_the_pipeline(tmp_path):
    from blip2_ray.weights.hf_format import image_processor

    image_processor(32).save_pretrained(str(tmp_path))
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    saved = PixelNormalizer.of_image_processor(BlipImageProcessorPil.from_pretrained(str(tmp_path)))
    np.testing.assert_array_equal(saved.table, CLIP.table)
    every = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16).repeat(3, 1)
    np.testing.assert_array_equal(saved.on_device(torch.from_numpy(every)).numpy(), normalize_pixels(every))
    rng = np.random.default_rng(0)
    odd = PixelNormalizer((0.5, 0.5, 0.5), (0.25, 0.5, 1.0), rescale=None)  # no rescale: raw byte values
    px = rng.integers(0, 256, (2, 3, 4, 4), dtype=np.uint8)
    np.testing.assert_allclose(odd(px), (px - 0.5) / np.array([0.25, 0.5, 1.0])[None, :, None, None], rtol=1e-6)


def test_the_processor_takes_sizes_lengths_and_prompt_from_the_config(tiny_tokenizers):
    from blip2_ray.weights.tokenizers import load_llm_tokenizer, load_qformer_tokenizer

    cfg = from_dict(DataConfig, {"image_size": 16, "qformer_max_len": 12, "llm_max_len": 9,
                                 "vqa_prompt": "Q: {} A:"})
    proc = ImageTextProcessor(cfg, qformer_tokenizer=load_qformer_tokenizer(tiny_tokenizers["qformer"]),
                              llm_tokenizer=load_llm_tokenizer(tiny_tokenizers["opt"]), llm_family="opt")
    im = Image.new("RGB", (40, 30), (200, 10, 10))
    batch = proc.eval_batch([im, im])
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], eval_transform(im, 16))
    assert proc.eval_batch([], 24).shape == (0, 3, 24, 24)
    assert proc.qformer_ids(["a red circle"])["qformer_input_ids"].shape == (1, 12)
    assert proc.llm_ids(["a red circle"])["llm_attention_mask"].shape == (1, 9)
    assert proc.llm_ids([])["llm_input_ids"].shape == (0, 9)
    assert proc.question_prompt("what colour?") == "Q: what colour? A:"
    row = proc.vqa_llm_ids([proc.question_prompt("what colour?")], ["red"])
    assert row["llm_input_ids"].shape == (1, 9) and 0 < row["llm_prompt_length"][0] < 9
    assert vqa_template("t5") == "Question: {} Short answer:" and vqa_template("opt") == vqa_template("decoder")
    assert vqa_prompt("why?", "decoder") == "Question: why? Answer:"
