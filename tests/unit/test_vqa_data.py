"""VQA fine-tuning data: VQAv2's official files and LAVIS lists -> parquet shards -> model-ready rows whose loss
covers only the answer, one human answer drawn per visit."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from blip2_ray.data.annotations import read_vqa_annotations, write_vqa_shards
from blip2_ray.data.config import DataConfig
from blip2_ray.data.processor import tokenize_vqa_llm
from blip2_ray.data.readers import read_parquet_records
from blip2_ray.data.records import process_records
from blip2_ray.errors import UserError
from blip2_ray.fixtures.sample_vqa import make_vqav2_sample


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    return make_vqav2_sample(str(tmp_path_factory.mktemp("vqa")), num_train=6, num_test=2, seed=1, noise=3)


def test_official_vqav2_files_resolve_images_by_data_subtype_and_keep_all_ten_answers(vqa):
    ann = read_vqa_annotations(vqa["train"], vqa["train_questions"], vqa["train_image_root"])
    assert len(ann.entries) == 12 and ann.num_images == 6 and not ann.missing
    e = ann.entries[0]
    assert os.path.basename(e["path"]) == f"COCO_train2014_{e['image_id']:012d}.jpg"
    assert e["question"] == "what colour is the shape?" and len(e["answers"]) == 10
    assert Counter(e["answers"]).most_common(1)[0][1] == 7


def test_a_lavis_vqa_list_reads_too_and_missing_images_are_counted(vqa, tmp_path):
    ann = read_vqa_annotations(vqa["train"], vqa["train_questions"], vqa["train_image_root"])
    lavis = [{"question_id": e["question_id"], "question": e["question"], "answer": e["answers"],
              "image": f"train2014/{os.path.basename(e['path'])}"} for e in ann.entries]
    lavis.append({"question_id": 1, "question": "is it?", "answer": ["yes"], "image": "train2014/nope.jpg"})
    path = tmp_path / "vqa_train.json"
    path.write_text(json.dumps(lavis))
    got = read_vqa_annotations(str(path), None, os.path.dirname(vqa["train_image_root"]))
    assert [e["answers"] for e in got.entries] == [e["answers"] for e in ann.entries]
    assert len(got.missing) == 1 and got.missing[0].endswith("nope.jpg")


def test_bad_vqa_inputs_are_one_sentence(vqa, tmp_path):
    with pytest.raises(UserError, match="questions file"):
        read_vqa_annotations(vqa["train"], None, vqa["train_image_root"])
    with pytest.raises(UserError, match="none of the images"):
        read_vqa_annotations(vqa["train"], vqa["train_questions"], str(tmp_path))
    (tmp_path / "x.json").write_text(json.dumps({"images": []}))
    with pytest.raises(UserError, match="no known VQA format"):
        read_vqa_annotations(str(tmp_path / "x.json"), None, str(tmp_path))


def test_shards_hold_one_row_per_question_and_every_visit_draws_an_answer_by_frequency(vqa, tmp_path,
                                                                                      tiny_tokenizers):
    ann = read_vqa_annotations(vqa["train"], vqa["train_questions"], vqa["train_image_root"])
    manifest = write_vqa_shards(ann, str(tmp_path / "shards"), 5, "fp")
    assert manifest["rows"] == 12 and manifest["images"] == 6 and len(manifest["files"]) == 3
    records = [r for f in manifest["files"] for r in read_parquet_records(f, ["jpg", "image"], ["caption"], print)]
    assert [r["question"] for r in records] == [e["question"] for e in ann.entries]
    assert records[0]["key"] == f"{ann.entries[0]['image_id']}/q{ann.entries[0]['question_id']}"

    cfg = DataConfig(image_size=32)
    draws = Counter()
    for epoch in range(40):
        out = process_records(records[:1], cfg, train=True, epoch=epoch, on_skip=print, llm_family="opt",
                              llm_tokenizer_path=tiny_tokenizers["opt"],
                              qformer_tokenizer_path=tiny_tokenizers["qformer"])
        draws[str(out["caption"][0])] += 1
    right = Counter(ann.entries[0]["answers"]).most_common(1)[0][0]
    assert set(draws) <= set(ann.entries[0]["answers"]) and len(draws) == 2  # the noisy answer is drawn too
    assert draws[right] > 20  # 7 of 10 annotators gave it
    assert out["question"][0] == "what colour is the shape?" and out["llm_prompt_length"].dtype == np.int64


def test_vqa_rows_put_the_prompt_first_and_count_its_tokens(tiny_tokenizers):
    from blip2_ray.weights.tokenizers import load_llm_tokenizer

    opt = load_llm_tokenizer(tiny_tokenizers["opt"])
    prompt = "Question: what shape is it? Answer:"
    row = tokenize_vqa_llm(opt, [prompt], ["circle"], 32, "opt")
    n, length = int(row["llm_attention_mask"][0].sum()), int(row["llm_prompt_length"][0])
    ids = row["llm_input_ids"][0]
    assert list(ids[:length]) == opt(prompt).input_ids  # BOS + prompt, no loss
    assert opt.decode(ids[length:n]) == " circle\n"  # the answer and OPT's caption end, the loss

    t5 = load_llm_tokenizer(tiny_tokenizers["t5"])
    row = tokenize_vqa_llm(t5, ["Question: what shape is it? Short answer:"], ["circle"], 32, "t5")
    ids, length = row["llm_input_ids"][0], int(row["llm_prompt_length"][0])
    assert ids[length - 1] == t5.eos_token_id  # the encoder's prompt ends in </s>
    assert ids[int(row["llm_attention_mask"][0].sum()) - 1] == t5.eos_token_id  # and so does the answer

    short = tokenize_vqa_llm(opt, [prompt], ["circle"], 6, "opt")  # too long: the answer is kept whole
    assert opt.decode(short["llm_input_ids"][0][int(short["llm_prompt_length"][0]):]) == " circle\n"


def test_vqa_configs_derive_one_prompt_for_training_and_evaluation():
    from pathlib import Path

    from blip2_ray.config import ConfigError, from_dict, load_config
    from blip2_ray.train.finetune_config import FinetuneConfig

    root = Path(__file__).resolve().parents[2]
    for name in ("finetune_vqa_tiny.yaml", "finetune_vqa_vqav2.yaml"):
        cfg = load_config(FinetuneConfig, root / "jobs/configs" / name)
        assert cfg.task == "vqa" and cfg.stage == 2 and not cfg.vision_training.freeze_vit
        assert cfg.data.vqa_prompt == cfg.evaluation.generation.prompt == "Question: {} Answer:"
    real = load_config(FinetuneConfig, root / "jobs/configs/finetune_vqa_vqav2.yaml")
    assert (real.model.vision.image_size, real.data.image_size, real.vision_training.layer_decay) == (490, 490, 0.95)
    assert real.train.max_steps == -(-443_757 * 5 // real.train.global_batch_size)
    base = {"task": "vqa", "annotations": {"train": "a.json"}, "data": {"image_size": 32}}
    t5 = from_dict(FinetuneConfig, {**base, "model": {"preset": "tiny_t5"}})
    assert t5.data.vqa_prompt == "Question: {} Short answer:"
    with pytest.raises(ConfigError, match="remove model.llm.prompt"):
        from_dict(FinetuneConfig, {**base, "model": {"llm": {"prompt": "x"}}})


def test_a_vqa_export_as_the_start_is_read_whole_and_keeps_its_own_question_tokenizer(tmp_path):
    from blip2_ray.config import from_dict
    from blip2_ray.train.finetune_config import FinetuneConfig
    from blip2_ray.train.finetune_job import resolve_start
    from blip2_ray.train.finetune_model import question_tokenizer_dir, starts_question_aware

    (tmp_path / "vqa").mkdir()
    (tmp_path / "vqa/config.json").write_text(json.dumps({"model_type": "instructblip"}))
    cfg = resolve_start(from_dict(FinetuneConfig, {"task": "vqa", "annotations": {"train": "a.json"},
                                                   "data": {"image_size": 32},
                                                   "model": {"init_from": str(tmp_path / "vqa")}}))
    assert cfg.model.hf_path == str(tmp_path / "vqa") and starts_question_aware(cfg)
    assert question_tokenizer_dir(cfg) == str(tmp_path / "vqa/qformer_tokenizer")
