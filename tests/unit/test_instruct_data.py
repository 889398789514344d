"""Instruction-tuning data (data/instruct.py): the readers of each task kind in the layouts users download (LLaVA-
Instruct's JSON, caption lists, VQAv2 / LAVIS VQA files), the paper's templates, bad input skipped and counted per
reason, sqrt(size) sampling weights, the shards and the rows the pipeline makes of them (one template and one
response drawn per visit, the loss on the response only), and the config checks of the held-in / held-out split."""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import numpy as np
import pytest

from blip2_ray.data.config import DataConfig
from blip2_ray.data.instruct import (
    EMPTY_RESPONSE,
    MISSING_IMAGE_FILE,
    NO_IMAGE,
    PAPER_TEMPLATES,
    TEMPLATE_WITHOUT_PLACEHOLDER,
    fill,
    read_instruct_source,
    usable_templates,
)
from blip2_ray.data.instruct_shards import sampling_weights, write_instruct_shards
from blip2_ray.data.pipeline import epoch_file_order
from blip2_ray.data.readers import read_parquet_records
from blip2_ray.data.records import process_records
from blip2_ray.errors import UserError


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from blip2_ray.fixtures.sample import _jpeg, draw_shape

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i, (c, s) in enumerate([("red", "circle"), ("blue", "square"), ("green", "triangle")]):
        (root / f"{i}.jpg").write_bytes(_jpeg(draw_shape(c, s, 32, rng)))
    return str(root)


def _write(tmp_path, name, data) -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def test_the_paper_templates_and_placeholders():
    assert [len(PAPER_TEMPLATES[k]) for k in ("caption", "vqa", "vqg")] == [13, 10, 6]
    assert all("{}" not in t for t in PAPER_TEMPLATES["caption"])
    assert all(t.count("{}") == 1 for k in ("vqa", "vqg") for t in PAPER_TEMPLATES[k])
    skipped = Counter()
    assert usable_templates("vqa", ["Q: {} A:", "no placeholder", "{}"], skipped) == ["Q: {} A:", "{}"]
    assert skipped == {TEMPLATE_WITHOUT_PLACEHOLDER: 1}
    assert fill('The question "{}" can be answered', "what is {x}?") == 'The question "what is {x}?" can be answered'


def test_llava_conversations_become_one_row_per_turn_and_bad_records_are_counted(images, tmp_path):
    data = [
        {"id": "0", "image": "0.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "It is red."},
            {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": "A circle."}]},
        {"id": "1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "2", "image": "nope.jpg", "conversations": [{"from": "human", "value": "<image>\nx"},
                                                           {"from": "gpt", "value": "y"}]},
        {"id": "3", "image": "1.jpg", "conversations": [{"from": "human", "value": "What is it?\n<image>"},
                                                        {"from": "gpt", "value": "  "}]},
    ]
    src = read_instruct_source("llava", "conversation", _write(tmp_path, "llava.json", data), images,
                               templates=["{}", "no placeholder here"])
    assert [(e["instructions"], e["responses"]) for e in src.entries] == [
        (["What colour is the shape?"], ["It is red."]), (["And its shape?"], ["A circle."])]
    assert src.entries[0]["key"] == "llava/0/0" and src.entries[1]["key"] == "llava/0/1"
    assert src.skipped == {NO_IMAGE: 1, MISSING_IMAGE_FILE: 1, EMPTY_RESPONSE: 1, TEMPLATE_WITHOUT_PLACEHOLDER: 1}


def test_caption_vqa_and_vqg_sources_read_the_files_the_project_reads(images, tmp_path):
    from blip2_ray.fixtures.sample_vqa import make_vqav2_sample

    caps = [{"image": "0.jpg", "caption": "A Red circle."}, {"image": "1.jpg", "caption": ["a blue square", ""]}]
    src = read_instruct_source("coco", "caption", _write(tmp_path, "caps.json", caps), images)
    assert [e["responses"] for e in src.entries] == [["a red circle"], ["a blue square"]]  # cleaned as BLIP-2 does
    assert src.entries[0]["instructions"] == PAPER_TEMPLATES["caption"] and src.skipped == {EMPTY_RESPONSE: 1}

    vqa = make_vqav2_sample(str(tmp_path / "vqav2"), num_train=3, num_test=1, seed=0)
    official = read_instruct_source("vqav2", "vqa", vqa["train"], vqa["train_image_root"],
                                    questions=vqa["train_questions"], templates=["Question: {} Short answer:"])
    assert len(official.entries) == 6 and len(official.entries[0]["responses"]) == 10
    assert official.entries[0]["instructions"] == ["Question: what colour is the shape? Short answer:"]
    lavis = [{"question_id": 1, "question": "what is it?", "image": "2.jpg", "answer": ["triangle"] * 2 + ["cone"]},
             {"question_id": 2, "question": "what colour?", "image": "1.jpg", "direct_answers": ["blue"]},
             {"question_id": 3, "question": "any?", "image": "0.jpg", "answers": [{"answer": "red"}]},
             {"question_id": 4, "question": "empty?", "image": "0.jpg", "answer": []}]
    path = _write(tmp_path, "vqa.json", lavis)
    got = read_instruct_source("okvqa", "vqa", path, images)
    assert [e["responses"] for e in got.entries] == [["triangle", "triangle", "cone"], ["blue"], ["red"]]
    assert got.skipped == {EMPTY_RESPONSE: 1}
    vqg = read_instruct_source("vqg", "vqg", path, images, templates=["Ask about: {}. Question:"])
    assert vqg.entries[0]["instructions"] == ["Ask about: triangle. Question:"]
    assert vqg.entries[0]["responses"] == ["what is it?"]


def test_a_source_without_a_usable_row_or_template_is_one_sentence(images, tmp_path):
    path = _write(tmp_path, "x.json", [{"question": "q?", "image": "nope.jpg", "answer": ["a"]}])
    with pytest.raises(UserError, match="no usable row.*missing_image_file 1"):
        read_instruct_source("x", "vqa", path, images)
    with pytest.raises(UserError, match="no usable instruction template"):
        read_instruct_source("x", "vqa", path, images, templates=["no placeholder"])
    with pytest.raises(UserError, match="LLaVA"):
        read_instruct_source("x", "conversation", path, images)


def test_sampling_weights_are_proportional_to_the_square_root_of_the_sizes():
    w = sampling_weights({"a": 100, "b": 400, "c": 2500})
    assert w["b"] / w["a"] == pytest.approx(2.0) and w["c"] / w["a"] == pytest.approx(5.0)
    assert sum(w.values()) == pytest.approx(1.0)
    w = sampling_weights({"a": 100, "b": 400}, {"b": 40.0})  # an override, relative to sqrt(100) = 10
    assert w["b"] == pytest.approx(0.8)


def test_shards_per_source_mix_at_the_shares_and_every_visit_draws_a_template(images, tmp_path, tiny_tokenizers):
    def rows(n):
        return [{"question": f"what is {i}?", "image": f"{i % 3}.jpg", "answer": [f"ans{i}"]} for i in range(n)]

    srcs = [read_instruct_source(n, "vqa", _write(tmp_path, f"{n}.json", rows(k)), images,
                                 templates=["Q: {} A:", "Question: {} Short answer:"])
            for n, k in (("small", 9), ("large", 36))]
    shares = sampling_weights({s.name: len(s.entries) for s in srcs})
    m = write_instruct_shards(srcs, shares, str(tmp_path / "shards"), 4, "fp")
    assert m["sources"]["small"]["shards"] == 3 and m["sources"]["large"]["shards"] == 9  # 3 and 4 rows per shard
    assert m["rows"] == 45 and m["train"] == [str(tmp_path / "shards" / n) for n in ("small", "large")]
    assert shares["large"] / shares["small"] == pytest.approx(2.0)
    per_source = [sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".parquet")) for d in m["train"]]
    import pyarrow.parquet as pq

    rows_of = {f: pq.ParquetFile(f).metadata.num_rows for fs in per_source for f in fs}
    seen = Counter()
    for epoch in range(300):  # rows of the visits drawn by data.weights: the sources at their shares
        for f in epoch_file_order(per_source, m["weights"], 0, epoch):
            seen["large" if "/large/" in f else "small"] += rows_of[f]
    assert seen["large"] / seen["small"] == pytest.approx(2.0, rel=0.1)

    records = list(read_parquet_records(per_source[0][0], ["image"], ["caption"], print))
    assert json.loads(records[0]["instruction"]) == ["Q: what is 0? A:", "Question: what is 0? Short answer:"]
    cfg = DataConfig(image_size=32, llm_max_len=24)
    drawn = Counter()
    for epoch in range(20):
        out = process_records(records[:1], cfg, train=True, epoch=epoch, on_skip=print, llm_family="opt",
                              llm_tokenizer_path=tiny_tokenizers["opt"],
                              qformer_tokenizer_path=tiny_tokenizers["qformer"])
        drawn[str(out["question"][0])] += 1
    assert set(drawn) == {"Q: what is 0? A:", "Question: what is 0? Short answer:"}  # one template per visit
    from blip2_ray.weights.tokenizers import load_llm_tokenizer

    tok = load_llm_tokenizer(tiny_tokenizers["opt"])
    prompt = str(out["question"][0])
    n = int(out["llm_prompt_length"][0])
    ids = out["llm_input_ids"][0][: int(out["llm_attention_mask"][0].sum())].tolist()
    assert ids[:n] == tok(prompt).input_ids  # what gets no loss: BOS + the instruction
    assert tok.decode(ids[n:]) == " ans0\n"  # the response and its end: the only tokens with a loss
    qids = out["qformer_input_ids"][0][: int(out["qformer_attention_mask"][0].sum())]
    from blip2_ray.weights.tokenizers import load_qformer_tokenizer

    assert qids.tolist() == load_qformer_tokenizer(tiny_tokenizers["qformer"])(prompt).input_ids  # to the Q-Former


def _instruct_cfg(tmp_path, **instruct):
    from blip2_ray.config import from_dict
    from blip2_ray.train.finetune_config import FinetuneConfig

    base = {"sources": [{"name": "colour", "kind": "vqa", "train": str(tmp_path / "c.json"), "eval": "e.json"},
                        {"name": "yesno", "kind": "vqa", "train": str(tmp_path / "y.json"), "eval": "y_test.json"}],
            "held_in": ["colour"], "held_out": ["yesno"]}
    return from_dict(FinetuneConfig, {"task": "instruct", "vision_training": {"freeze_vit": True},
                                      "model": {"init_from": "x"}, "data": {"image_size": 32},
                                      "instruct": {**base, **instruct}})


def test_the_held_in_held_out_split_is_checked_when_the_config_loads(tmp_path):
    from blip2_ray.config import ConfigError

    cfg = _instruct_cfg(tmp_path)
    assert cfg.stage == 2 and [(h, s.name) for h, s in cfg.instruct.evaluated()] == [("held_in", "colour"),
                                                                                      ("held_out", "yesno")]
    with pytest.raises(ConfigError, match="'yesno' is held out and also held in"):
        _instruct_cfg(tmp_path, held_in=["colour", "yesno"])
    srcs = [{"name": "colour", "kind": "vqa", "train": str(tmp_path / "c.json")},
            {"name": "again", "kind": "vqa", "train": "x.json", "eval": str(tmp_path / "c.json")}]
    with pytest.raises(ConfigError, match="reads .*c.json.*which held-in source 'colour' trains on"):
        _instruct_cfg(tmp_path, sources=srcs, held_out=["again"])
    with pytest.raises(ConfigError, match="names 'nope', which is no source"):
        _instruct_cfg(tmp_path, held_out=["nope"])
    with pytest.raises(ConfigError, match="freeze_vit: true"):
        from blip2_ray.config import from_dict
        from blip2_ray.train.finetune_config import FinetuneConfig

        from_dict(FinetuneConfig, {"task": "instruct", "data": {"image_size": 32},
                                   "instruct": {"sources": [{"name": "a", "train": "a.json"}], "held_in": ["a"]}})
    assert math.isclose(sum(sampling_weights({"a": 1, "b": 1}).values()), 1.0)
