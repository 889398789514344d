"""A model with a CLIP ViT-L (the vitl_* presets), which no HF BLIP-2 class holds, exports in our own directory
format (weights/native_format.py, docs/checkpoints.md) and every loader reads it: stage 1 -> stage 2 (the ViT comes
along through model.init_from) -> load_stage1 / load_stage2 (Serve, evaluation, CapFilt) -> fine-tuning (caption,
VQA); the streamed (ZeRO-3) writer writes the same directory. Tiny sizes, the real layout."""

from __future__ import annotations

import json

import pytest
import torch

from blip2_ray.errors import UserError
from blip2_ray.model.config import model_config
from blip2_ray.weights.builders import build_stage1, build_stage2
from blip2_ray.weights.hf_format import export_stage1, export_stage2, load_stage1, load_stage2
from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer
from blip2_ray.weights.weight_sources import export_kind

CLIP = {"kind": "clip_vit_l", "layer_norm_eps": 1e-5}


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Keys whose values differ (or that one side lacks)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(set(sa) ^ set(sb)) + [k for k in sa if k in sb and not torch.equal(sa[k].float(), sb[k].float())]


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny_tokenizers):
    """A random tiny CLIP stage-1 model and its export; a stage-2 model started from that export, and its export."""
    root = tmp_path_factory.mktemp("clip_exports")
    torch.manual_seed(0)
    cfg1 = model_config("tiny", vision=CLIP)
    s1 = build_stage1(cfg1)
    export_stage1(s1, str(root / "stage1"), qformer_tokenizer(cfg1), cfg1)
    cfg2 = model_config("tiny", vision=CLIP, init_from=str(root / "stage1"))
    torch.manual_seed(1)
    s2 = build_stage2(cfg2)
    export_stage2(s2, str(root / "stage2"), llm_tokenizer(cfg2), cfg2)
    return {"root": root, "s1": s1, "s2": s2, "stage1": str(root / "stage1"), "stage2": str(root / "stage2")}


def test_stage1_round_trip_and_transformers_refuses_the_directory(exports):
    from transformers import AutoConfig

    d = exports["stage1"]
    data = json.loads(open(f"{d}/config.json").read())
    assert data["model_type"] == "blip2_ray" and data["architectures"] == ["Blip2ForImageTextRetrieval"]
    assert data["vision_config"]["model_type"] == "clip_vision_model" and export_kind(data) == "stage1"
    model, tok = load_stage1(d, vision_dtype="float32")
    assert same_state(exports["s1"], model) == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = exports["s1"].eval().image_feats(exports["s1"].encode_image(x))
        assert torch.equal(model.eval().image_feats(model.encode_image(x)), want)
    assert tok.bos_token == "[DEC]"
    with pytest.raises(ValueError, match="blip2_ray"):  # never a BLIP-2 with a random EVA ViT
        AutoConfig.from_pretrained(d)


def test_stage2_takes_the_stage1_vit_and_round_trips(exports):
    s1, s2 = exports["s1"], exports["s2"]
    fc1 = "clip.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(s2.vision_model.state_dict()[fc1], s1.vision_model.state_dict()[fc1])
    data = json.loads(open(f"{exports['stage2']}/config.json").read())
    assert export_kind(data) == "stage2"
    loaded = load_stage2(exports["stage2"], vision_dtype=torch.float32, llm_dtype=torch.float32)
    assert same_state(s2, loaded) == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded.eval().visual_prompt(x), s2.eval().visual_prompt(x))
    half = load_stage2(exports["stage2"], vision_dtype=torch.bfloat16, llm_dtype=torch.bfloat16)
    assert half.vision_model.clip.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert half.vision_model.post_layernorm.weight.dtype == torch.float32  # ln_vision trains in float32
    assert half.qformer.layernorm.weight.dtype == torch.float32


def test_streamed_export_writes_the_same_directory(exports, tmp_path):
    """The writer of training runs (ZeRO-3 gathers one tensor at a time), in small shards."""
    from safetensors.torch import load_file

    from blip2_ray.weights.hf_export_stream import export_streamed

    s2 = exports["s2"]
    tensors = ((k, v) for k, v in s2.state_dict().items() if not k.endswith("lm_head.weight"))
    out = export_streamed(s2, 2, tensors, str(tmp_path / "streamed"), llm_tokenizer(model_config("tiny")),
                          max_shard_bytes=20_000)
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    assert json.loads(open(f"{out}/config.json").read())["model_type"] == "blip2_ray"
    assert same_state(load_stage2(out, vision_dtype=torch.float32, llm_dtype=torch.float32), s2) == []
    whole = load_file(f"{exports['stage2']}/model.safetensors")
    assert "vision_model.clip.encoder.layers.0.mlp.fc1.weight" in whole


def test_a_stage1_export_as_vision_path_and_a_wrong_kind(exports):
    from blip2_ray.weights.vision import build_vision_model
    from blip2_ray.weights.weight_sources import init_from_source, vision_source_at

    cfg = model_config("tiny", vision=CLIP)
    tower = build_vision_model(cfg.vision, vision_source_at(exports["stage1"], cfg.vision))
    assert same_state(tower, exports["s1"].vision_model) == []
    eva = model_config("tiny")
    with pytest.raises(UserError, match="holds a CLIP ViT but model.vision.kind is 'eva_vit_g'"):
        vision_source_at(exports["stage1"], eva.vision)
    with pytest.raises(UserError, match="is a stage-2"):
        init_from_source(exports["stage2"])


def test_finetuning_starts_from_the_exports_and_exports_vqa(exports, tmp_path):
    """Caption fine-tuning's start (model.init_from -> hf_path) with the ViT trained, and VQA's question-aware
    Q-Former (its text path from the stage-1 export): a step changes the ViT, the export loads back."""
    from blip2_ray.config import from_dict
    from blip2_ray.train.finetune_config import FinetuneConfig
    from blip2_ray.train.finetune_job import resolve_start
    from blip2_ray.train.tasks import task_of
    from blip2_ray.weights.tokenizers import load_qformer_tokenizer

    base = {"model": {"preset": "tiny", "vision": CLIP, "init_from": exports["stage2"]}, "run_name": "ft",
            "annotations": {"train": "unused.json", "image_root": "."}, "scaling": {"num_workers": 1},
            "data": {"image_size": 32}}
    for task in ("caption", "vqa"):
        extra = {"vqa": {"question_encoder_from": exports["stage1"]}} if task == "vqa" else {}
        cfg = resolve_start(from_dict(FinetuneConfig, {**base, "task": task, **extra}))
        assert cfg.model.hf_path == exports["stage2"]
        torch.manual_seed(0)
        model = task_of(cfg).build_model(cfg)  # the task spec: build_stage2, finetune_model, the question path
        assert model.takes_question == (task == "vqa")
        before = model.vision_model.clip.encoder.layers[0].mlp.fc1.weight.detach().clone()
        ids = torch.randint(5, 20, (2, 6))
        kwargs = {}
        if task == "vqa":
            kwargs = dict(prompt_lengths=torch.tensor([2, 2]), question_ids=torch.randint(5, 20, (2, 5)),
                          question_mask=torch.ones(2, 5, dtype=torch.long))
        loss = model.train()(torch.randn(2, 3, 32, 32), ids, torch.ones_like(ids), **kwargs).loss
        loss.backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
        assert not torch.equal(model.vision_model.clip.encoder.layers[0].mlp.fc1.weight, before), task
        qtok = load_qformer_tokenizer(exports["stage1"]) if task == "vqa" else None
        out = export_stage2(model, str(tmp_path / task), llm_tokenizer(cfg.model), cfg.model, qformer_tokenizer=qtok)
        data = json.loads(open(f"{out}/config.json").read())
        assert export_kind(data) == ("vqa" if task == "vqa" else "stage2")
        back = load_stage2(out, vision_dtype=torch.float32, llm_dtype=torch.float32)
        assert back.takes_question == (task == "vqa") and same_state(back, model) == []


def test_capfilt_accepts_the_exports_as_its_blip2_models(exports):
    from blip2_ray.capfilt.captioners import Blip2Captioner
    from blip2_ray.capfilt.filters import Blip2ItcFilter

    Blip2ItcFilter.check(exports["stage1"])
    Blip2Captioner.check(exports["stage2"])
    with pytest.raises(UserError, match="needs a Blip2ForImageTextRetrieval directory"):
        Blip2ItcFilter.check(exports["stage2"])
