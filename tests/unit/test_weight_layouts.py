"""Every real weight source, written at tiny size in exactly its published layout, loads through the config's
path fields and its tensor values arrive; a file that does not fit is one UserError naming keys and file."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from blip2_ray.errors import UserError
from blip2_ray.model.config import model_config
from blip2_ray.model.vision import vision_module
from blip2_ray.weights.builders import build_stage1, build_stage2
from blip2_ray.weights.hf_format import export_stage1, export_stage2
from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer
from blip2_ray.weights.vision import build_vision_model
from blip2_ray.weights.weight_sources import check_weight_sources, vision_source_at

G = torch.Generator().manual_seed(0)


def rand(*shape, scale=0.05):
    return torch.randn(*shape, generator=G) * scale


def ln_pair(prefix: str, dim: int, legacy: bool = False) -> dict:
    w, b = ("gamma", "beta") if legacy else ("weight", "bias")
    return {f"{prefix}.{w}": 1 + rand(dim), f"{prefix}.{b}": rand(dim)}


def eva_state(depth: int, dim: int = 32, mlp: int = 64, patch: int = 8, grid: int = 4) -> dict:
    """LAVIS's eva_vit_g.pth layout (bare EVA keys), `depth` blocks, plus EVA's final norm and head."""
    sd = {"cls_token": rand(1, 1, dim, scale=0.5), "pos_embed": rand(1, grid * grid + 1, dim, scale=0.5),
          "patch_embed.proj.weight": rand(dim, 3, patch, patch), "patch_embed.proj.bias": rand(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(ln_pair(p + "norm1", dim))
        sd.update(ln_pair(p + "norm2", dim))
        sd.update({p + "attn.qkv.weight": rand(3 * dim, dim, scale=0.2), p + "attn.q_bias": rand(dim),
                   p + "attn.v_bias": rand(dim), p + "attn.proj.weight": rand(dim, dim, scale=0.2),
                   p + "attn.proj.bias": rand(dim), p + "mlp.fc1.weight": rand(mlp, dim, scale=0.2),
                   p + "mlp.fc1.bias": rand(mlp), p + "mlp.fc2.weight": rand(dim, mlp, scale=0.2),
                   p + "mlp.fc2.bias": rand(dim)})
    sd.update(ln_pair("norm", dim))
    sd.update({"head.weight": rand(10, dim), "head.bias": rand(10)})
    return sd


def assert_eva_arrived(eva: dict, vit_state: dict, depth: int) -> None:
    v = vit_state
    assert torch.equal(v["embeddings.class_embedding"], eva["cls_token"])
    assert torch.equal(v["embeddings.patch_embedding.weight"], eva["patch_embed.proj.weight"])
    for i in range(depth):
        e, h = f"blocks.{i}.", f"encoder.layers.{i}."
        q, vb = eva[e + "attn.q_bias"], eva[e + "attn.v_bias"]
        assert torch.equal(v[h + "self_attn.qkv.bias"], torch.cat([q, torch.zeros_like(q), vb]))
        assert torch.equal(v[h + "self_attn.qkv.weight"], eva[e + "attn.qkv.weight"])
        assert torch.equal(v[h + "self_attn.projection.weight"], eva[e + "attn.proj.weight"])
        assert torch.equal(v[h + "layer_norm2.bias"], eva[e + "norm2.bias"])
        assert torch.equal(v[h + "mlp.fc2.weight"], eva[e + "mlp.fc2.weight"])
    assert not any(k.startswith(f"encoder.layers.{depth}.") for k in v)


# ------------------------------------------------------------------------------------------------ ViT
def test_vit_from_a_vit_only_hf_directory(tmp_path):
    cfg = model_config("tiny", vision={"dtype": "float16"})
    torch.manual_seed(1)
    src = vision_module(model_config("tiny").vision)
    src.save_pretrained(tmp_path / "vit")
    vit = build_vision_model(cfg.vision, vision_source_at(str(tmp_path / "vit"), cfg.vision))
    got = vit.state_dict()
    for k, v in src.state_dict().items():
        want_dtype = torch.float32 if k.startswith("post_layernorm.") else torch.float16
        assert got[k].dtype == want_dtype, k
        assert torch.equal(got[k], v.to(want_dtype)), k


def test_vit_from_a_whole_blip2_directory(tmp_path, tiny_tokenizers):
    torch.manual_seed(2)
    cfg = model_config("tiny")
    tok = llm_tokenizer(cfg)
    model = build_stage2(cfg, tok)
    export_stage2(model, str(tmp_path / "blip2"), tok, cfg)
    vit = build_vision_model(cfg.vision, vision_source_at(str(tmp_path / "blip2"), cfg.vision))
    want = model.vision_model.state_dict()
    assert vit.state_dict().keys() == want.keys()
    for k, v in vit.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_vit_from_lavis_eva_checkpoint_drops_the_last_block_norm_and_head(tmp_path):
    cfg = model_config("tiny")  # 2 blocks kept, as BLIP-2 keeps 39 of EVA's 40
    eva = eva_state(depth=3)
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    vit = build_vision_model(cfg.vision, vision_source_at(str(tmp_path / "eva_vit_g.pth"), cfg.vision))
    state = vit.state_dict()
    assert_eva_arrived(eva, state, depth=2)
    assert torch.equal(state["embeddings.position_embedding"], eva["pos_embed"])
    # EVA has no ln_vision: it starts as LayerNorm's own init, as LAVIS's does
    assert torch.equal(state["post_layernorm.weight"], torch.ones(32))


def test_eva_position_embeddings_are_interpolated_bicubically_for_another_image_size(tmp_path):
    cfg = model_config("tiny", vision={"image_size": 48})  # grid 6 from the checkpoint's grid 4
    eva = eva_state(depth=2)
    torch.save(eva, tmp_path / "eva.pth")
    vit = build_vision_model(cfg.vision, vision_source_at(str(tmp_path / "eva.pth"), cfg.vision))
    pos = eva["pos_embed"]
    grid = pos[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 36, 32)
    want = torch.cat([pos[:, :1], grid], 1)
    assert torch.allclose(vit.state_dict()["embeddings.position_embedding"], want, atol=1e-6)


def _clip_tiny(layers: int = 3):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(3)
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                            num_attention_heads=4, image_size=32, patch_size=8))


CLIP_CFG = dict(kind="clip_vit_l", layer_norm_eps=1e-5)


@pytest.mark.parametrize("layout", ["clip_vision_v5", "clip_vision_published", "clip_model"])
def test_clip_vit_from_its_hf_directory(tmp_path, layout):
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    cfg = model_config("tiny", vision=CLIP_CFG)
    src = _clip_tiny()
    d = tmp_path / layout
    if layout == "clip_vision_v5":  # CLIPVisionModel.save_pretrained of transformers 5: bare keys
        src.save_pretrained(d)
    elif layout == "clip_vision_published":  # e.g. a CLIPVisionModel written by transformers 4: vision_model.*
        d.mkdir()
        state = {f"vision_model.{k}": v.contiguous() for k, v in src.state_dict().items()}
        state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
        save_file(state, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**src.config.to_dict(), "model_type": "clip_vision_model"}))
    else:  # openai/clip-vit-large-patch14 is a whole CLIPModel: vision_model.*, text_model.*, projections
        clip = CLIPModel(CLIPConfig(vision_config=src.config.to_dict(), projection_dim=16,
                                    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=4, vocab_size=99, bos_token_id=0,
                                                     eos_token_id=1, pad_token_id=1)))
        clip.vision_model.load_state_dict(src.state_dict())
        clip.save_pretrained(d)
    tower = build_vision_model(cfg.vision, vision_source_at(str(d), cfg.vision))
    got = tower.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("encoder.layers.2."):
            assert torch.equal(got[f"clip.{k}"], v), k
    assert not any(k.startswith("clip.encoder.layers.2.") for k in got)  # 2 of 3 layers kept, as 23 of 24
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = src(pixel_values=x, output_hidden_states=True).hidden_states[2]
        assert torch.allclose(tower.trunk(x), want, atol=1e-5)


# ------------------------------------------------------------------------------------------- Q-Former
def bert_as_published(tmp_path, tok, q, legacy=True):
    """bert-base-uncased's pytorch_model.bin: BertForPreTraining keys under bert., gamma/beta, cls. heads."""
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(4)
    config = BertConfig(vocab_size=len(tok) - 1, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
                        num_attention_heads=q.num_heads, intermediate_size=q.intermediate_size,
                        max_position_embeddings=512)
    state = BertForPreTraining(config).state_dict()
    if legacy:
        state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
                 for k, v in state.items()}
    state["bert.embeddings.position_ids"] = torch.arange(512)[None]
    d = tmp_path / "bert-base-uncased"
    d.mkdir()
    torch.save(state, d / "pytorch_model.bin")
    (d / "config.json").write_text(json.dumps(config.to_dict()))
    return d, state


def test_qformer_from_bert_base_uncased_as_published(tmp_path, tiny_tokenizers):
    cfg = model_config("tiny")
    tok = qformer_tokenizer(cfg)
    d, b = bert_as_published(tmp_path, tok, cfg.qformer)
    s = build_stage1(model_config("tiny", qformer={"init_from_bert": str(d)}), tok).state_dict()
    for i in range(cfg.qformer.num_layers):
        e, q = f"bert.encoder.layer.{i}.", f"qformer.encoder.layer.{i}."
        assert torch.equal(s[q + "attention.attention.key.weight"], b[e + "attention.self.key.weight"])
        assert torch.equal(s[q + "attention.output.LayerNorm.weight"], b[e + "attention.output.LayerNorm.gamma"])
        for ffn in ("intermediate", "intermediate_query"):
            assert torch.equal(s[q + f"{ffn}.dense.weight"], b[e + "intermediate.dense.weight"])
        for ffn in ("output", "output_query"):
            assert torch.equal(s[q + f"{ffn}.dense.bias"], b[e + "output.dense.bias"])
            assert torch.equal(s[q + f"{ffn}.LayerNorm.bias"], b[e + "output.LayerNorm.beta"])
    n = len(tok) - 1
    assert torch.equal(s["embeddings.word_embeddings.weight"][:n], b["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(s["embeddings.word_embeddings.weight"][n], torch.zeros(cfg.qformer.hidden_size))  # [DEC]
    assert torch.equal(s["embeddings.position_embeddings.weight"], b["bert.embeddings.position_embeddings.weight"][:64])
    assert torch.equal(s["qformer.layernorm.weight"], b["bert.embeddings.LayerNorm.gamma"])
    assert torch.equal(s["lm_head.layer_norm.bias"], b["cls.predictions.transform.LayerNorm.beta"])
    assert torch.equal(s["lm_head.bias"][:n], b["cls.predictions.bias"])


def test_bert_key_the_table_does_not_know_or_a_missing_one_is_one_error(tmp_path, tiny_tokenizers):
    cfg = model_config("tiny")
    tok = qformer_tokenizer(cfg)
    d, state = bert_as_published(tmp_path, tok, cfg.qformer)
    state["bert.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"no rule for bert\.encoder\.layer\.0\.attention\.self\.rotary\.weight") as e:
        build_stage1(model_config("tiny", qformer={"init_from_bert": str(d)}), tok)
    assert "bert-base-uncased" in str(e.value)
    del state["bert.encoder.layer.0.attention.self.rotary.weight"]
    del state["bert.encoder.layer.1.output.dense.weight"]
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(UserError, match=r"lacks weights the model needs: .*layer\.1\.output"):
        build_stage1(model_config("tiny", qformer={"init_from_bert": str(d)}), tok)


def test_bert_of_the_wrong_size_is_one_error(tmp_path, tiny_tokenizers):
    cfg = model_config("tiny")
    tok = qformer_tokenizer(cfg)
    d, _ = bert_as_published(tmp_path, tok, model_config("tiny", qformer={"hidden_size": 48, "num_heads": 4}).qformer)
    with pytest.raises(UserError, match=r"BERT with hidden_size 48, the config expects 32: set model.qformer.hidden"):
        check_weight_sources(model_config("tiny", qformer={"init_from_bert": str(d)}), stage=1)
    (d / "config.json").unlink()  # without a config the tensors' shapes tell
    with pytest.raises(UserError, match=r"does not fit the configured model \(wrong size\?\)"):
        build_stage1(model_config("tiny", qformer={"init_from_bert": str(d)}), tok)


# ------------------------------------------------------------------------------------------ bad input
class NotATensor:
    pass


def test_pickled_objects_are_refused_with_weights_only(tmp_path):
    torch.save({"blocks.0.attn.qkv.weight": NotATensor()}, tmp_path / "evil.pth")
    cfg = model_config("tiny", vision={"path": str(tmp_path / "evil.pth")})
    with pytest.raises(UserError, match=r"evil\.pth.*not a plain tensor checkpoint that loads with weights_only"):
        check_weight_sources(cfg, stage=1)


def test_hub_id_bert_dir_as_vit_and_wrong_size_each_get_one_sentence(tmp_path, tiny_tokenizers):
    with pytest.raises(UserError, match=r"model.vision.path 'Salesforce/blip2-opt-2.7b' does not exist.*download"):
        check_weight_sources(model_config("tiny", vision={"path": "Salesforce/blip2-opt-2.7b"}), stage=1)
    d, _ = bert_as_published(tmp_path, qformer_tokenizer(model_config("tiny")), model_config("tiny").qformer)
    with pytest.raises(UserError, match=r"holds a 'bert' model; expected a BLIP-2 directory"):
        check_weight_sources(model_config("tiny", vision={"path": str(d)}), stage=1)
    torch.manual_seed(0)
    vision_module(model_config("tiny").vision).save_pretrained(tmp_path / "tiny_vit")
    with pytest.raises(UserError, match=r"holds a ViT with hidden_size 32, the config expects 1408.*hidden_size"):
        check_weight_sources(model_config("vitg_opt2.7b", vision={"path": str(tmp_path / "tiny_vit")}), stage=1)
    torch.save(eva_state(depth=2), tmp_path / "eva.pth")
    with pytest.raises(UserError, match=r"eva\.pth.*ViT with width 32, the config expects 1408"):
        check_weight_sources(model_config("vitg_opt2.7b", vision={"path": str(tmp_path / "eva.pth")}), stage=1)
    with pytest.raises(UserError, match=r"holds an EVA ViT but model.vision.kind is 'clip_vit_l'"):
        check_weight_sources(model_config("tiny", vision={"path": str(tmp_path / "eva.pth"), **CLIP_CFG}), stage=1)


def test_eva_file_with_a_key_the_table_does_not_know_names_it_and_the_file(tmp_path):
    cfg = model_config("tiny")
    eva = eva_state(depth=2)
    eva["blocks.0.attn.relative_position_bias_table"] = rand(5, 4)
    torch.save(eva, tmp_path / "eva.pth")
    with pytest.raises(UserError, match=r"eva\.pth.*no rule for blocks\.0\.attn\.relative_position_bias_table"):
        build_vision_model(cfg.vision, vision_source_at(str(tmp_path / "eva.pth"), cfg.vision))


# ---------------------------------------------------------------------------- no random frozen weights
def test_real_presets_need_a_weight_source_for_each_frozen_part_unless_allowed():
    with pytest.raises(UserError, match=r"model.vision.path is not set, so the frozen ViT of preset 'vitg_opt2.7b'"):
        check_weight_sources(model_config("vitg_opt2.7b"), stage=1)
    with pytest.raises(UserError, match=r"model.vision.path is not set.*model.allow_random_init=true"):
        build_stage1(model_config("vitl_opt2.7b"))  # before anything is allocated
    check_weight_sources(model_config("vitg_opt2.7b", allow_random_init=True), stage=2)
    check_weight_sources(model_config("tiny"), stage=2)  # the tiny presets are random by design


def test_stage2_of_a_real_preset_needs_the_llm_path(tmp_path):
    torch.save(eva_state(depth=2), tmp_path / "eva.pth")
    vision = {"path": str(tmp_path / "eva.pth"), "hidden_size": 32, "intermediate_size": 64, "patch_size": 8,
              "num_layers": 2}
    check_weight_sources(model_config("vitg_opt2.7b", vision=vision), stage=1)
    with pytest.raises(UserError, match=r"model.llm.path is not set, so the frozen LLM of preset 'vitg_opt2.7b'"):
        check_weight_sources(model_config("vitg_opt2.7b", vision=vision), stage=2)


# ------------------------------------------------------------------------ stage 2 inherits the stage-1 ViT
@pytest.fixture(scope="module")
def stage1_export_with_vit_dir(tmp_path_factory, tiny_tokenizers):
    root = tmp_path_factory.mktemp("inherit")
    torch.manual_seed(5)
    vision_module(model_config("tiny").vision).save_pretrained(root / "vit")
    cfg = model_config("tiny", vision={"path": str(root / "vit")})
    tok = qformer_tokenizer(cfg)
    stage1 = build_stage1(cfg, tok)
    export_stage1(stage1, str(root / "stage1"), tok, cfg)
    return root, stage1


def test_stage2_takes_the_frozen_vit_of_its_stage1_export(stage1_export_with_vit_dir, tiny_tokenizers):
    from transformers import Blip2ForImageTextRetrieval

    root, stage1 = stage1_export_with_vit_dir
    torch.manual_seed(99)  # a random ViT would differ
    stage2 = build_stage2(model_config("tiny", init_from=str(root / "stage1")))
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    vit = [k for k in s1 if k.startswith("vision_model.")]
    assert vit and all(torch.equal(s1[k], s2[k]) for k in vit)
    assert torch.equal(s1["query_tokens"], s2["query_tokens"])
    # the same ViT named again is fine; another one contradicts the export
    build_stage2(model_config("tiny", init_from=str(root / "stage1"), vision={"path": str(root / "vit")}))
    vision_module(model_config("tiny").vision).save_pretrained(root / "other_vit")
    with pytest.raises(UserError, match=r"model.vision.path .*other_vit' contradicts model.init_from"):
        build_stage2(model_config("tiny", init_from=str(root / "stage1"), vision={"path": str(root / "other_vit")}))
    hf = Blip2ForImageTextRetrieval.from_pretrained(str(root / "stage1"))  # still HF's retrieval model
    assert torch.equal(hf.vision_model.embeddings.class_embedding, s1["vision_model.embeddings.class_embedding"])


def test_an_init_from_of_another_qformer_size_is_refused_before_building(stage1_export_with_vit_dir, tmp_path):
    root, _ = stage1_export_with_vit_dir
    with pytest.raises(UserError, match=r"holds 8 queries, the config expects 4: set model.qformer.num_query_tokens"):
        check_weight_sources(model_config("tiny", init_from=str(root / "stage1"), qformer={"num_query_tokens": 4}), 2)
    torch.save({"model": {"query_tokens": torch.zeros(1, 32, 768), "Qformer.bert.encoder.layer.0.x": torch.zeros(1)}},
               tmp_path / "blip2.pth")
    with pytest.raises(UserError, match=r"blip2\.pth' holds a Q-Former / BERT with hidden_size 768, the config"):
        check_weight_sources(model_config("tiny", init_from=str(tmp_path / "blip2.pth")), 2)


def test_stage2_refuses_an_export_trained_with_another_ln_vision_eps(stage1_export_with_vit_dir, tiny_tokenizers):
    root, _ = stage1_export_with_vit_dir
    with pytest.raises(UserError, match=r"set model.vision.ln_vision_eps=1e-06"):
        build_stage2(model_config("tiny", init_from=str(root / "stage1"), vision={"ln_vision_eps": 1e-5}))


def test_the_training_job_checks_weight_sources_before_any_worker_starts(tmp_path):
    from blip2_ray.config import from_dict
    from blip2_ray.train.config import PretrainConfig
    from blip2_ray.train.trainer import check_inputs

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "000.tar").write_bytes(b"")

    def job(**model):
        data = {"train": [str(tmp_path / "shards")], "image_size": 32 if model["preset"] == "tiny" else 224}
        return from_dict(PretrainConfig, {"stage": 1, "data": data, "model": model})

    with pytest.raises(UserError, match=r"model.vision.path is not set, so the frozen ViT"):
        check_inputs(job(preset="vitg_opt2.7b"))
    assert check_inputs(job(preset="vitl_opt2.7b", allow_random_init=True))  # exports in our own format
    assert check_inputs(job(preset="tiny"))
