"""One owner of preprocessing (data/processor.py, data/transforms.py): CLIP's constants once, one pixel
normaliser for the pipeline, evaluation, CapFilt and Serve, token lengths and prompts from the config."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
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


TEXTS = ["a red circle", "A Photo of a GREEN square on a white background!", "", "what shape is it?",
         "ünïcödé café ☕ 日本", "word " * 60, "two  spaces\tand\nnew lines", "[DEC] [CLS] </s> <s> <pad>"]


def _token_columns(tok, family: str | None, qformer: bool) -> dict:
    from blip2_ray.data.processor import tokenize_llm, tokenize_qformer, tokenize_vqa_llm
    from blip2_ray.model.caption_end import appends_eos, caption_end_ids, caption_stop_ids

    if qformer:
        cols = {**tokenize_qformer(tok, TEXTS, 12), **{"plain": np.array(tok(TEXTS)["input_ids"], dtype=object)}}
    else:
        cols = {**tokenize_llm(tok, TEXTS, 9, family), **tokenize_vqa_llm(tok, TEXTS, TEXTS[::-1], 20, family),
                "end": np.array(caption_end_ids(tok, family)), "stop": np.array(caption_stop_ids(tok, family)),
                "appends_eos": np.array(appends_eos(tok)),
                "bare": np.array(tok(TEXTS, add_special_tokens=False)["input_ids"], dtype=object)}
    cols["specials"] = np.array([tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id,
                                 len(tok)], dtype=object)
    return cols


def test_a_tokenizer_loaded_by_its_class_tokenises_as_the_autotokenizer_one(tiny_tokenizers, tmp_path):
    """The decode tasks load a tokenizer by the class AutoTokenizer chose on the driver (records.tokenizer_classes):
    the same class, the same columns, for every family and for a directory of the project's own export format."""
    import json
    import shutil

    from blip2_ray.weights.export_kinds import NATIVE_MODEL_TYPE
    from blip2_ray.weights.tokenizers import load_llm_tokenizer, load_qformer_tokenizer, tokenizer_class_name

    native = tmp_path / "native"
    shutil.copytree(tiny_tokenizers["qformer"], native)
    (native / "config.json").write_text(json.dumps({"model_type": NATIVE_MODEL_TYPE}))
    cases = [("qformer", tiny_tokenizers["qformer"], None, True), ("native", str(native), None, True)] + [
        (name, tiny_tokenizers[name], name, False) for name in ("opt", "t5", "llama", "qwen2")]
    for name, path, family, qformer in cases:
        load = load_qformer_tokenizer if qformer else load_llm_tokenizer
        auto = load(path)
        by_class = load(path, tokenizer_class_name(auto))
        assert type(by_class) is type(auto), name
        want, got = _token_columns(auto, family, qformer), _token_columns(by_class, family, qformer)
        assert want.keys() == got.keys()
        for column in want:
            assert want[column].tolist() == got[column].tolist(), (name, column)


def test_only_a_transformers_class_loads_a_tokenizer(tiny_tokenizers):
    from blip2_ray.errors import UserError
    from blip2_ray.weights.tokenizers import load_tokenizer

    with pytest.raises(UserError, match="holds no readable tokenizer"):
        load_tokenizer(tiny_tokenizers["opt"], tokenizer_class="os:system")


def test_a_decode_task_tokenises_without_importing_torch(tiny_tokenizers):
    """What a decode task runs (pipeline._ShardToRows -> process_records), with the classes the driver found: no torch
    (5.2 CPU s of each decode process on the 2-core machine, for AutoTokenizer's config classes)."""
    import json
    import sys

    from blip2_ray.data.records import tokenizer_classes

    classes = tokenizer_classes(tiny_tokenizers["qformer"], tiny_tokenizers["opt"])
    assert all(classes.values())
    code = f"""
import io, sys
from PIL import Image
import blip2_ray.data.pipeline
from blip2_ray.data.config import DataConfig
from blip2_ray.data.records import process_records
buf = io.BytesIO(); Image.new("RGB", (40, 40), "red").save(buf, format="PNG")
out = process_records([{{"key": "k", "image": buf.getvalue(), "caption": "a red square"}}], DataConfig(image_size=32),
                      train=True, on_skip=print, qformer_tokenizer_path={tiny_tokenizers["qformer"]!r},
                      llm_tokenizer_path={tiny_tokenizers["opt"]!r}, llm_family="opt", **{json.dumps(classes)})
assert out["qformer_input_ids"].shape == (1, 32) and out["llm_input_ids"].shape == (1, 32), out
print("torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False", "a decode task imported torch"
