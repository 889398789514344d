"""The paper's CapFilt pair on tiny random models: BLIP captions exactly as HF samples them, CLIP keeps exactly
its own top two, the 77-token limit truncates and counts, and wrong model directories fail before any actor.

References are computed here straight from transformers (BlipForConditionalGeneration / CLIPModel and
their processors, loaded from the same directories), never through the code under test.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from blip2_ray.capfilt.config import CapFiltConfig, CaptionerConfig, FilterConfig
from blip2_ray.config import ConfigError, from_dict
from blip2_ray.errors import UserError

K = 4
SAMPLING = {"top_p": 0.9, "temperature": 1.0, "repetition_penalty": 1.1, "max_new_tokens": 7, "min_new_tokens": 3}


def _images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)  # different sizes: the processors resize (BLIP) and crop (CLIP)
    return [Image.fromarray(rng.integers(0, 255, (36 + 4 * i, 48 - 3 * i, 3), dtype=np.uint8)) for i in range(n)]


def _hf_blip(path):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    return BlipProcessor.from_pretrained(path), BlipForConditionalGeneration.from_pretrained(path).eval()


def _hf_blip_captions(path, images, prompt: str, cut_prompt: bool, seed: int) -> list[str]:
    """What transformers' own generate samples: processor -> generate -> batch_decode (BLIP's example)."""
    processor, model = _hf_blip(path)
    inputs = processor(images=images, text=[prompt] * len(images) if prompt else None, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, num_beams=1, num_return_sequences=K, **SAMPLING)
    if cut_prompt:  # BLIP's prompt_length: the prompt's ids without [SEP], i.e. [DEC] + its words
        n = len(processor.tokenizer(prompt).input_ids) - 1
        dec_prompt = [model.config.text_config.bos_token_id] + inputs.input_ids[0, 1:n].tolist()
        assert out[:, :n].tolist() == [dec_prompt] * len(out)
        out = out[:, n:]
    return [t.strip() for t in processor.batch_decode(out, skip_special_tokens=True)]


@pytest.mark.parametrize("prompt,prepend", [("a picture of", False), ("a picture of", True), ("", True)],
                         ids=["prompt-cut", "prompt-kept", "unconditional"])
def test_blip_captions_equal_transformers_generate(tiny_blip_clip, prompt, prepend):
    from blip2_ray.capfilt.captioners import BlipCaptioner

    images = _images()
    cap = BlipCaptioner(CaptionerConfig(kind="blip", model=tiny_blip_clip["blip"], num_captions=K, prompt=prompt,
                                        prepend_prompt=prepend, dtype="float32", **SAMPLING))
    torch.manual_seed(7)
    got = cap.caption(images)
    want = _hf_blip_captions(tiny_blip_clip["blip"], images, prompt, cut_prompt=bool(prompt) and not prepend, seed=7)
    assert [len(g) for g in got] == [K] * len(images)
    assert [c for g in got for c in g] == want
    assert len(set(want)) > 1  # sampled, not one repeated caption
    if prompt and prepend:
        assert all(c.startswith(prompt) for c in want)
    assert cap.provenance == {"kind": "blip", "model": "blip-image-captioning-large"}


def _clip_logits(path, image, texts) -> np.ndarray:
    from transformers import CLIPModel, CLIPProcessor

    processor, model = CLIPProcessor.from_pretrained(path), CLIPModel.from_pretrained(path).eval()
    inputs = processor(text=texts, images=[image], return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        return model(**inputs).logits_per_image[0].numpy()


def test_blip_clip_worker_keeps_clip_top_two(tiny_blip_clip, tmp_path):
    """The composed worker: BLIP's samples + the web caption, ranked by CLIP, the top two kept, exactly."""
    from blip2_ray.capfilt.worker import CapFiltWorker
    from blip2_ray.config import to_dict
    from blip2_ray.data.transforms import clean_caption

    cfg = from_dict(CapFiltConfig, {
        "input": ["unused"], "output_dir": str(tmp_path),
        "captioner": {"kind": "blip", "model": tiny_blip_clip["blip"], "num_captions": K, "prompt": "a picture of",
                      "prepend_prompt": False, "dtype": "float32", **SAMPLING},
        "filter": {"kind": "clip", "model": tiny_blip_clip["clip"], "keep": 2, "dtype": "float32"}})
    worker = CapFiltWorker(to_dict(cfg))
    images = _images()
    long_web = " ".join(["zebras"] * 60)  # cleaned to 50 words, each several tokens: > 77 CLIP tokens
    web = [["A Red Circle!"], ["a blue square", long_web], ["a photo of a green star"]]
    torch.manual_seed(11)
    results, truncated = worker.caption_and_filter(images, web)

    synth = _hf_blip_captions(tiny_blip_clip["blip"], images, "a picture of", cut_prompt=True, seed=11)
    for i, (image, res) in enumerate(zip(images, results)):
        mine = [clean_caption(s) for s in synth[i * K:(i + 1) * K] if clean_caption(s)]  # the worker keeps them cleaned
        cands, flags = [], []
        for text, is_synth in [(w, False) for w in web[i]] + [(s, True) for s in mine]:
            if clean_caption(text) and clean_caption(text) not in [clean_caption(c) for c in cands]:
                cands.append(text)
                flags.append(is_synth)
        logits = _clip_logits(tiny_blip_clip["clip"], image, [clean_caption(c) for c in cands])
        top2 = np.argsort(-logits, kind="stable")[:2]
        assert res["captions"] == [cands[j] for j in top2]
        assert res["synthetic"] == [flags[j] for j in top2]
        assert res["scores"] == pytest.approx(logits[top2].tolist(), rel=1e-4, abs=1e-5)
        assert res["generated"] == len(mine)
    assert truncated == 1  # the long web caption, scored on its first 77 tokens, not an error


def test_clip_truncates_long_captions_to_77_tokens_and_counts(tiny_blip_clip):
    from transformers import CLIPModel, CLIPProcessor

    from blip2_ray.capfilt.filters import ClipFilter

    path = tiny_blip_clip["clip"]
    filt = ClipFilter(FilterConfig(kind="clip", model=path, dtype="float32"))
    assert filt.text_max_len == 77
    processor, model = CLIPProcessor.from_pretrained(path), CLIPModel.from_pretrained(path).eval()
    long = " ".join(["a red circle"] * 40)
    fits = " ".join(["red"] * 75)  # 75 words = 75 tokens + start + end = 77: fits exactly
    assert len(processor.tokenizer(fits).input_ids) == 77 and len(processor.tokenizer(long).input_ids) > 77
    with pytest.raises(Exception, match="max_position_embeddings"):  # why truncation is needed at all
        model(**processor(text=[long], images=_images(1), return_tensors="pt"))
    scores, truncated = filt.score(_images(1), [[long, fits, "a red circle"]])
    assert truncated == 1
    ids = processor.tokenizer([long], truncation=True, max_length=77).input_ids[0]
    assert len(ids) == 77 and ids[-1] == processor.tokenizer.eos_token_id  # cut inside the text, end token kept
    assert scores[0] == pytest.approx(_clip_logits(path, _images(1)[0], [long, fits, "a red circle"]), rel=1e-4)


def test_itc_filter_counts_captions_past_the_qformer_length():
    from blip2_ray.capfilt.filters import count_truncated
    from blip2_ray.weights.tiny_tokenizers import build_tiny_tokenizers, default_tiny_tokenizer_dir
    from blip2_ray.weights.tokenizers import load_qformer_tokenizer

    tok = load_qformer_tokenizer(build_tiny_tokenizers(default_tiny_tokenizer_dir())["qformer"])
    assert count_truncated(tok, ["a red circle", " ".join(["red"] * 30), " ".join(["red"] * 31)], 32) == 1


# ---------------------------------------------------------------- wrong directories: one sentence before Ray
def _cfg(tmp_path, captioner: dict, filt: dict) -> CapFiltConfig:
    return from_dict(CapFiltConfig, {"input": ["x"], "output_dir": str(tmp_path / "out"), "captioner": captioner,
                                     "filter": filt})


def _fake_dir(root, name: str, config: dict):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return str(d)


def test_check_models_accepts_the_paper_pair(tiny_blip_clip, tmp_path):
    from blip2_ray.capfilt.job import check_models

    check_models(_cfg(tmp_path, {"kind": "blip", "model": tiny_blip_clip["blip"]},
                      {"kind": "clip", "model": tiny_blip_clip["clip"]}))


def test_check_models_rejects_wrong_model_types(tiny_blip_clip, tmp_path):
    from blip2_ray.capfilt.job import check_models

    blip2 = _fake_dir(tmp_path, "blip2-opt-2.7b",
                      {"model_type": "blip-2", "architectures": ["Blip2ForConditionalGeneration"]})
    bert = _fake_dir(tmp_path, "bert-base-uncased", {"model_type": "bert", "architectures": ["BertForMaskedLM"]})
    itm = _fake_dir(tmp_path, "blip2-itm-vit-g",
                    {"model_type": "blip-2", "architectures": ["Blip2ForImageTextRetrieval"]})
    clip, blip = {"kind": "clip", "model": tiny_blip_clip["clip"]}, {"kind": "blip", "model": tiny_blip_clip["blip"]}
    cases = [
        ({"kind": "blip", "model": blip2}, clip,
         r"captioner.model .*blip2-opt-2.7b.* holds a Blip2ForConditionalGeneration model .*captioner.kind=blip "
         r"needs a BlipForConditionalGeneration"),
        (blip, {"kind": "clip", "model": bert},
         r"filter.model .*holds a BertForMaskedLM model \(config.json model_type 'bert'\), but filter.kind=clip "
         r"needs a CLIPModel"),
        (blip, {"kind": "clip", "model": tiny_blip_clip["blip"]}, r"filter.kind=clip needs a CLIPModel"),
        ({"kind": "blip", "model": tiny_blip_clip["clip"]}, clip, r"captioner.kind=blip needs a BlipForConditional"),
        ({"kind": "blip2", "model": itm}, clip, r"captioner.kind=blip2 needs a Blip2ForConditionalGeneration"),
        (blip, {"kind": "blip2_itc", "model": blip2}, r"filter.kind=blip2_itc needs a Blip2ForImageTextRetrieval"),
        (blip, {"kind": "clip", "model": "openai/clip-vit-large-patch14"}, r"is not a local directory"),
        (blip, {"kind": "clip", "model": str(tmp_path)}, r"no config.json"),
    ]
    for captioner, filt, message in cases:
        with pytest.raises(UserError, match=message) as e:
            check_models(_cfg(tmp_path, captioner, filt))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind,remove,message", [
    ("clip", ["preprocessor_config.json"], "no image processor config"),
    ("clip", ["tokenizer.json", "vocab.json"], "no tokenizer"),
    ("blip", ["tokenizer.json", "vocab.txt"], "no tokenizer"),
    ("blip", ["preprocessor_config.json"], "no image processor config"),
    ("blip", ["model.safetensors"], "no weights"),
])
def test_check_models_rejects_incomplete_directories(tiny_blip_clip, tmp_path, kind, remove, message):
    from blip2_ray.capfilt.job import check_models

    broken = tmp_path / f"broken-{kind}"
    shutil.copytree(tiny_blip_clip[kind], broken)
    for name in remove:
        (broken / name).unlink()
    models = {"blip": {"kind": "blip", "model": tiny_blip_clip["blip"]},
              "clip": {"kind": "clip", "model": tiny_blip_clip["clip"]}}
    models[kind]["model"] = str(broken)
    with pytest.raises(UserError, match=message):
        check_models(_cfg(tmp_path, models["blip"], models["clip"]))


def test_check_models_rejects_unreadable_or_foreign_tokenizers(tiny_blip_clip, tmp_path):
    from blip2_ray.capfilt.job import check_models

    corrupt = tmp_path / "corrupt-clip"
    shutil.copytree(tiny_blip_clip["clip"], corrupt)
    (corrupt / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="filter.model processor .*could not be loaded"):
        check_models(_cfg(tmp_path, {"kind": "blip", "model": tiny_blip_clip["blip"]},
                          {"kind": "clip", "model": str(corrupt)}))
    foreign = tmp_path / "blip-with-clip-tokenizer"  # CLIP's 700-token BPE beside a 200-token BLIP decoder
    shutil.copytree(tiny_blip_clip["blip"], foreign)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{tiny_blip_clip['clip']}/{name}", foreign / name)
    with pytest.raises(UserError, match="tokenizer files belong to another model"):
        check_models(_cfg(tmp_path, {"kind": "blip", "model": str(foreign)},
                          {"kind": "clip", "model": tiny_blip_clip["clip"]}))


def test_kinds_are_validated():
    ok = {"input": ["x/"], "output_dir": "o", "filter": {"model": "f"}, "captioner": {"model": "c"}}
    cfg = from_dict(CapFiltConfig, ok)
    assert (cfg.captioner.kind, cfg.filter.kind, cfg.captioner.repetition_penalty) == ("blip2", "blip2_itc", 1.0)
    with pytest.raises(ConfigError, match="captioner.kind: 'blip3' is not one of 'blip2', 'blip'"):
        from_dict(CapFiltConfig, {**ok, "captioner": {"model": "c", "kind": "blip3"}})
    with pytest.raises(ConfigError, match="filter.dtype: 'fp16' is not one of"):
        from_dict(CapFiltConfig, {**ok, "filter": {"model": "f", "dtype": "fp16"}})
    with pytest.raises(ConfigError, match=r"filter.model must name a CLIPModel directory \(filter.kind=clip\)"):
        from_dict(CapFiltConfig, {**ok, "filter": {"kind": "clip"}})


def test_resume_refuses_an_output_dir_written_by_another_pair(tmp_path):
    from blip2_ray.capfilt.job import plan
    from blip2_ray.fixtures.sample import make_sample_shards
    from blip2_ray.runtime.files import write_json_atomic

    make_sample_shards(str(tmp_path / "in"), num=2, shards=2, image_size=32)
    out = tmp_path / "out"
    out.mkdir()
    cfg = from_dict(CapFiltConfig, {"input": [str(tmp_path / "in")], "output_dir": str(out),
                                    "captioner": {"kind": "blip", "model": "/m/blip-image-captioning-large"},
                                    "filter": {"kind": "clip", "model": "/m/clip-vit-large-patch14"}})
    open(out / "00000.tar", "wb").close()
    written = {"captioner": {"kind": "blip", "model": "blip-image-captioning-large"},
               "filter": {"kind": "clip", "model": "clip-vit-large-patch14"}}
    write_json_atomic(str(out / "00000.tar.capfilt.json"), {"models": written})
    assert [f.rsplit("/", 1)[1] for f in plan(cfg)[1]] == ["00001.tar"]  # same pair: resumes
    write_json_atomic(str(out / "00000.tar.capfilt.json"), {"models": {**written, "filter": {"kind": "blip2_itc",
                                                                                        "model": "stage1"}}})
    with pytest.raises(UserError, match="already holds 00000.tar written by .*blip2_itc.*use a new output_dir"):
        plan(cfg)


def test_shipped_paper_config_is_the_papers_setup():
    from pathlib import Path

    from blip2_ray.config import load_config

    cfg = load_config(CapFiltConfig, Path(__file__).resolve().parents[2] / "jobs" / "configs" / "capfilt_paper.yaml")
    cc, fc = cfg.captioner, cfg.filter
    assert (cc.kind, cc.model.rsplit("/", 1)[1], cc.num_captions, cc.top_p) == ("blip", "blip-image-captioning-large",
                                                                               10, 0.9)
    assert (fc.kind, fc.model.rsplit("/", 1)[1], fc.keep) == ("clip", "clip-vit-large-patch14", 2)
