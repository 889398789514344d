"""Weights move both ways between this project and transformers' BLIP-2 classes, with equal outputs."""

from __future__ import annotations

import pytest
import torch

from blip2_ray.errors import UserError
from blip2_ray.model.caption_end import caption_stop_ids
from blip2_ray.model.config import model_config
from blip2_ray.model.prefix_lm import prefix_lm_split
from blip2_ray.weights import convert
from blip2_ray.weights.builders import build_stage1, build_stage2
from blip2_ray.weights.checkpoint_files import TensorFiles
from blip2_ray.weights.hf_format import export_stage1, export_stage2, load_stage1, load_stage2
from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer

TOL = 1e-4


def _pixels(cfg, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    return torch.randn(n, 3, s, s, generator=g)


@pytest.fixture(scope="module", params=["tiny", "tiny_t5"])
def stage2_export(request, tmp_path_factory, tiny_tokenizers):
    torch.manual_seed(0)
    cfg = model_config(request.param)
    tok = llm_tokenizer(cfg)
    model = build_stage2(cfg, tok).eval()
    out = export_stage2(model, str(tmp_path_factory.mktemp(request.param)), tok, cfg)
    return cfg, tok, model, out


def _hf_stage2(path):
    from transformers import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def test_stage2_logits_match_transformers(stage2_export):
    cfg, tok, model, path = stage2_export
    hf = _hf_stage2(path)
    x = _pixels(cfg)
    nq = cfg.qformer.num_query_tokens
    img = hf.config.image_token_index
    if cfg.llm.kind == "opt":
        enc = tok(["a red circle\n", "a blue square on a white background\n"], padding="longest", return_tensors="pt")
        with torch.no_grad():
            ours = model(x, enc.input_ids, enc.attention_mask).logits
            ids = torch.cat([torch.full((2, nq), img), enc.input_ids], 1)
            mask = torch.cat([torch.ones(2, nq, dtype=torch.long), enc.attention_mask], 1)
            theirs = hf(pixel_values=x, input_ids=ids, attention_mask=mask).logits[:, nq - 1 : -1]
    else:
        enc = tok(["a red circle on a white background", "a blue square"], padding="longest", return_tensors="pt")
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            ours = model(x, enc.input_ids, enc.attention_mask, generator=g).logits
            enc_ids, enc_mask, labels = prefix_lm_split(
                enc.input_ids, enc.attention_mask, tok.eos_token_id, tok.pad_token_id, torch.Generator().manual_seed(5)
            )
            ids = torch.cat([torch.full((2, nq), img), enc_ids], 1)
            mask = torch.cat([torch.ones(2, nq, dtype=torch.long), enc_mask], 1)
            theirs = hf(pixel_values=x, input_ids=ids, attention_mask=mask, labels=labels).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= TOL


def test_stage2_greedy_captions_token_identical(stage2_export):
    cfg, tok, model, path = stage2_export
    hf = _hf_stage2(path)
    x = _pixels(cfg, n=3, seed=1)
    nq = cfg.qformer.num_query_tokens
    img = hf.config.image_token_index
    eos = caption_stop_ids(tok, cfg.llm.kind)
    settings = dict(num_beams=1, max_new_tokens=8, min_new_tokens=2, eos_token_id=eos, do_sample=False)
    ours = model.generate(x, **settings)
    if cfg.llm.kind == "opt":
        ids = torch.cat([torch.full((3, nq), img), torch.full((3, 1), tok.bos_token_id)], 1)
        theirs = hf.generate(pixel_values=x, input_ids=ids, pad_token_id=tok.pad_token_id, **settings)[:, nq + 1 :]
    else:
        ids = torch.full((3, nq), img)
        theirs = hf.generate(pixel_values=x, input_ids=ids, pad_token_id=tok.pad_token_id, **settings)[:, 1:]
    assert ours.tolist() == theirs.tolist()


def test_stage2_loads_back_with_the_same_outputs(stage2_export):
    cfg, tok, model, path = stage2_export
    loaded = load_stage2(path, vision_dtype=torch.float32, llm_dtype=torch.float32).eval()
    x = _pixels(cfg)
    assert loaded.llm_kind == model.llm_kind and loaded.llm_family == model.llm_family
    assert torch.allclose(loaded.visual_prompt(x), model.visual_prompt(x), atol=1e-6)
    a, b = model.generate(x, num_beams=2, max_new_tokens=5), loaded.generate(x, num_beams=2, max_new_tokens=5)
    assert a.tolist() == b.tolist()


def test_stage2_loads_in_bfloat16_with_the_trainable_parts_exact_in_float32(stage2_export):
    cfg, tok, model, path = stage2_export
    loaded = load_stage2(path, vision_dtype=torch.bfloat16, llm_dtype="bfloat16")
    a, b = model.state_dict(), loaded.state_dict()
    for k in b:
        trainable = k.startswith(("qformer.", "query_tokens", "language_projection.", "vision_model.post_layernorm."))
        assert b[k].dtype == (torch.float32 if trainable else torch.bfloat16), k
        if trainable:
            assert torch.equal(a[k], b[k]), k
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def stage1_export(tmp_path_factory, tiny_tokenizers):
    torch.manual_seed(0)
    cfg = model_config("tiny")
    tok = qformer_tokenizer(cfg)
    model = build_stage1(cfg, tok).eval()
    path = export_stage1(model, str(tmp_path_factory.mktemp("stage1")), tok, cfg)
    return cfg, tok, model, path


def test_stage1_export_loads_in_transformers_with_same_itm_and_itc(stage1_export):
    from transformers import Blip2ForImageTextRetrieval

    cfg, tok, model, path = stage1_export
    hf, info = Blip2ForImageTextRetrieval.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    hf.eval()
    assert info["missing_keys"] == set() or not info["missing_keys"]
    x = _pixels(cfg, n=2)
    enc = tok(["a red circle", "a blue square on a white background"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        hf_itm = hf(pixel_values=x, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                    use_image_text_matching_head=True).logits_per_image
        hf_itc = hf(pixel_values=x, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                    use_image_text_matching_head=False).logits_per_image
        image = model.encode_image(x)
        our_itm = model.itm_logits(image, enc.input_ids, enc.attention_mask)
        feats = model.image_feats(image)
        text = model.text_feat(enc.input_ids, enc.attention_mask)
        our_itc = torch.einsum("bqe,ne->bnq", feats, text).amax(-1)
    assert (our_itm - hf_itm).abs().max().item() <= TOL
    assert hf_itc.shape == (2, 2)
    assert (our_itc - hf_itc).abs().max().item() <= TOL


def test_stage1_roundtrip_keeps_every_weight_including_extras(stage1_export):
    cfg, tok, model, path = stage1_export
    loaded, tok2 = load_stage1(path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].float(), b[k].float()), k
    assert tok2.bos_token == "[DEC]"


def test_a_retrieval_directory_without_our_extras_loads_with_a_fresh_lm_head_and_temperature(stage1_export, tmp_path):
    import shutil

    cfg, tok, model, path = stage1_export
    shutil.copytree(path, tmp_path / "itm")
    (tmp_path / "itm" / "stage1_extras.safetensors").unlink()
    (tmp_path / "itm" / "blip2_ray_model.yaml").unlink()  # as Salesforce's blip2-itm-vit-g: HF files only
    loaded, _ = load_stage1(str(tmp_path / "itm"))
    a, b = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(a[k].float(), b[k].float()) for k in a if not k.startswith("lm_head.") and k != "temp")
    assert loaded.temp.item() == pytest.approx(cfg.qformer.temp_init) and loaded.temp.requires_grad
    assert torch.equal(loaded.lm_head.bias, torch.zeros_like(loaded.lm_head.bias))
    assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_stage2_initialises_from_a_stage1_export(stage1_export):
    cfg, tok, stage1, path = stage1_export
    stage2 = build_stage2(model_config("tiny", init_from=path))
    s1, s2 = stage1.state_dict(), stage2.state_dict()
    for k in ("query_tokens", "qformer.encoder.layer.0.crossattention.attention.query.weight",
              "qformer.encoder.layer.1.output_query.dense.weight", "vision_model.post_layernorm.weight"):
        assert torch.equal(s1[k].float(), s2[k].float()), k


def test_lavis_state_dict_converts_to_our_keys(stage1_export):
    cfg, tok, model, path = stage1_export
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    # write the same weights under LAVIS's names (the inverse of the documented renames), by hand
    lavis = {}
    for k, v in ours.items():
        if k.startswith("vision_model.encoder.layers.") and k.endswith("self_attn.qkv.bias"):
            i = k.split(".")[3]
            d = v.shape[0] // 3
            ours[k] = torch.cat([v[:d], torch.zeros(d), v[2 * d :]])  # EVA has no k bias
            lavis[f"visual_encoder.blocks.{i}.attn.q_bias"] = v[:d]
            lavis[f"visual_encoder.blocks.{i}.attn.v_bias"] = v[2 * d :]
            continue
        n = (k.replace("vision_model.embeddings.class_embedding", "visual_encoder.cls_token")
             .replace("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed")
             .replace("vision_model.embeddings.patch_embedding.", "visual_encoder.patch_embed.proj.")
             .replace("vision_model.encoder.layers.", "visual_encoder.blocks.")
             .replace(".layer_norm1.", ".norm1.").replace(".layer_norm2.", ".norm2.")
             .replace(".self_attn.qkv.", ".attn.qkv.").replace(".self_attn.projection.", ".attn.proj.")
             .replace("vision_model.post_layernorm.", "ln_vision.")
             .replace("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm.")
             .replace("embeddings.word_embeddings.", "Qformer.bert.embeddings.word_embeddings.")
             .replace("embeddings.position_embeddings.", "Qformer.bert.embeddings.position_embeddings.")
             .replace("qformer.encoder.", "Qformer.bert.encoder.")
             .replace(".attention.attention.", ".attention.self.")
             .replace(".crossattention.attention.", ".crossattention.self.")
             .replace("lm_head.dense.", "Qformer.cls.predictions.transform.dense.")
             .replace("lm_head.layer_norm.", "Qformer.cls.predictions.transform.LayerNorm.")
             .replace("lm_head.bias", "Qformer.cls.predictions.bias")
             .replace("vision_projection.", "vision_proj.").replace("text_projection.", "text_proj."))
        lavis[n] = v
    lavis["Qformer.cls.predictions.decoder.weight"] = ours["embeddings.word_embeddings.weight"]
    lavis["Qformer.bert.embeddings.position_ids"] = torch.arange(4)
    files = convert.InMemoryTensors(lavis)
    plan = convert.plan_conversion(convert.LAVIS_BLIP2, files.keys(), "lavis")
    converted = convert.convert_tensors(plan, files, model.state_dict())
    assert converted.keys() == ours.keys()
    for k in ours:
        assert torch.equal(converted[k], ours[k]), k


def test_lavis_checkpoint_file_loads_weights_only(tmp_path):
    ckpt = {"model": {"query_tokens": torch.zeros(1, 2, 4), "opt_proj.weight": torch.ones(3, 4)}, "epoch": 3}
    torch.save(ckpt, tmp_path / "c.pth")
    files = TensorFiles(str(tmp_path / "c.pth"))
    plan = convert.plan_conversion(convert.LAVIS_BLIP2, files.keys(), "c.pth")
    sd = convert.convert_tensors(plan, files, {})
    assert set(sd) == {"query_tokens", "language_projection.weight"}
    assert torch.equal(sd["language_projection.weight"], torch.ones(3, 4))
    with pytest.raises(UserError):
        TensorFiles(str(tmp_path / "missing.pth"))


def test_qformer_initialises_from_a_bert_directory(tmp_path, tiny_tokenizers):
    from transformers import BertConfig, BertForMaskedLM

    cfg = model_config("tiny")
    tok = qformer_tokenizer(cfg)
    q = cfg.qformer
    bert = BertForMaskedLM(BertConfig(vocab_size=len(tok) - 1, hidden_size=q.hidden_size,
                                      num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
                                      intermediate_size=q.intermediate_size,
                                      max_position_embeddings=q.max_position_embeddings))
    bert.save_pretrained(tmp_path / "bert")
    model = build_stage1(model_config("tiny", qformer={"init_from_bert": str(tmp_path / "bert")}), tok)
    b = bert.state_dict()
    s = model.state_dict()
    for i in range(q.num_layers):
        text_ffn = b[f"bert.encoder.layer.{i}.intermediate.dense.weight"]
        assert torch.equal(s[f"qformer.encoder.layer.{i}.intermediate.dense.weight"], text_ffn)
        assert torch.equal(s[f"qformer.encoder.layer.{i}.intermediate_query.dense.weight"], text_ffn)
        assert torch.equal(s[f"qformer.encoder.layer.{i}.output_query.dense.weight"],
                           b[f"bert.encoder.layer.{i}.output.dense.weight"])
        assert torch.equal(s[f"qformer.encoder.layer.{i}.attention.attention.query.weight"],
                           b[f"bert.encoder.layer.{i}.attention.self.query.weight"])
    assert torch.equal(s["embeddings.word_embeddings.weight"][: len(tok) - 1],
                       b["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(s["qformer.layernorm.weight"], b["bert.embeddings.LayerNorm.weight"])
    assert torch.equal(s["lm_head.dense.weight"], b["cls.predictions.transform.dense.weight"])


def test_hub_id_without_network_is_one_clear_error():
    with pytest.raises(UserError, match="not a local directory"):
        load_stage2("Salesforce/blip2-opt-2.7b")
    with pytest.raises(UserError, match="not a local directory"):
        build_stage2(model_config("tiny", llm={"path": "facebook/opt-2.7b"}))


def test_a_whole_blip2_directory_builds_stage2_through_hf_path(stage2_export):
    cfg, tok, model, path = stage2_export
    kind = cfg.llm.kind
    again = build_stage2(model_config(cfg.preset, hf_path=path, vision={"dtype": "float32"}, llm={"dtype": "float32"}))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match=r"model.hf_path loads the whole model; remove model.llm.path"):
        build_stage2(model_config(cfg.preset, hf_path=path, llm={"kind": kind, "path": path}))


def test_an_llm_directory_missing_a_weight_is_one_error_not_a_random_init(tmp_path, tiny_tokenizers):
    from safetensors.torch import load_file, save_file

    from blip2_ray.weights.language_model import build_language_model

    cfg = model_config("tiny")
    tok = llm_tokenizer(cfg)
    llm = build_language_model(cfg, 568)
    llm.save_pretrained(tmp_path / "opt")
    state = load_file(str(tmp_path / "opt" / "model.safetensors"))
    missing = "model.decoder.layers.1.fc1.weight"
    del state[missing]
    save_file(state, str(tmp_path / "opt" / "model.safetensors"), metadata={"format": "pt"})
    fits = rf"model.llm.path .* does not fit AutoModelForCausalLM \(missing keys: {missing}"
    with pytest.raises(UserError, match=fits):
        build_stage2(model_config("tiny", llm={"path": str(tmp_path / "opt")}), tok)
