"""LoRA on the frozen LLM (model/llm_lora.py) and the instruction-tuned model's export: only the adapters (and the
Q-Former) train, a target the LLM lacks is one sentence naming the modules it has, the export merges the adapters
into a plain InstructBlipForConditionalGeneration directory from which transformers gives the same logits and
generates the same tokens as the project, and the adapters saved alone load in peft."""

from __future__ import annotations

import pytest
import torch

from blip2_ray.errors import UserError
from blip2_ray.model.config import model_config
from blip2_ray.model.llm_lora import (
    ADAPTER,
    add_llm_lora,
    linear_module_names,
    merged_lora_state,
    save_lora_adapter,
)
from blip2_ray.model.prompts import generate_text
from blip2_ray.weights.builders import build_stage1, build_stage2
from blip2_ray.weights.hf_format import export_stage1
from blip2_ray.weights.lora_targets import check_lora_targets
from blip2_ray.weights.question_encoder import make_question_aware
from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer

PROMPTS = ["Question: what colour is it? Short answer:", "A short image caption:"]


@pytest.fixture(scope="module")
def instruct_model(tmp_path_factory, tiny_tokenizers):
    """A tiny instruction-aware stage-2 model with LoRA (r 4) on its OPT, adapters moved off their zero init."""
    torch.manual_seed(0)
    cfg = model_config("tiny")
    s1 = export_stage1(build_stage1(cfg), str(tmp_path_factory.mktemp("s1")), qformer_tokenizer(cfg), cfg)
    tok = llm_tokenizer(cfg)
    model = build_stage2(cfg, tok)
    base_llm = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    make_question_aware(model, s1)
    targets = add_llm_lora(model, r=4, alpha=8.0, dropout=0.1, targets=None)
    with torch.no_grad():
        for name, p in model.language_model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)  # B starts at zero (no change); a trained adapter does change the LLM
    return cfg, tok, qformer_tokenizer(cfg), model.eval(), targets, base_llm


def _pixels(cfg, n=2):
    s = cfg.vision.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(1))


def test_only_the_adapters_of_the_llm_train_in_float32_and_their_dropout_trains_while_the_llm_stays_eval(
        instruct_model):
    cfg, _, _, model, targets, _ = instruct_model
    assert targets == ["q_proj", "v_proj"]  # peft's default for OPT
    llm_trainable = [n for n, p in model.language_model.named_parameters() if p.requires_grad]
    assert llm_trainable and all(".lora_A." in n or ".lora_B." in n for n in llm_trainable)
    assert all(p.dtype == torch.float32 for n, p in model.language_model.named_parameters() if p.requires_grad)
    assert sum(".q_proj.lora_A." in n for n in llm_trainable) == cfg.llm.num_layers
    assert all(p.requires_grad for p in model.qformer.parameters())
    model.train()
    try:
        dropouts = [m for n, m in model.language_model.named_modules() if n.endswith(f"lora_dropout.{ADAPTER}")]
        assert dropouts and all(m.training for m in dropouts)
        assert not model.language_model.training and not model.language_model.model.decoder.layers[0].training
    finally:
        model.eval()


def test_a_target_the_llm_lacks_is_one_sentence_naming_the_modules_it_has(instruct_model):
    cfg = instruct_model[0]
    with pytest.raises(UserError, match=r"'query_key_value'.*its linear modules are: fc1, fc2, k_proj, lm_head, "
                                        r"out_proj, q_proj, v_proj"):
        check_lora_targets(cfg, ["q_proj", "query_key_value"])
    assert check_lora_targets(cfg, ["fc1"]) == ["fc1"]
    assert check_lora_targets(model_config("tiny_t5"), None) == ["q", "v"]  # built on meta: no weights read
    assert "wo" in linear_module_names(build_stage2(model_config("tiny_t5")).language_model)


def test_the_merged_stream_is_the_plain_llm_with_the_adapters_folded_in(instruct_model):
    _, _, _, model, _, base_llm = instruct_model
    adapters = {}
    merged = dict(merged_lora_state(model, model.state_dict().items(), adapters))
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    key = "language_model.model.decoder.layers.1.self_attn.v_proj"
    layer = model.get_submodule(key)
    a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
    expected = base_llm[key.removeprefix("language_model.") + ".weight"] + b @ a * 2.0  # alpha / r
    assert torch.allclose(merged[key + ".weight"], expected, atol=1e-6)
    assert torch.equal(merged[key + ".bias"], base_llm[key.removeprefix("language_model.") + ".bias"])
    assert len(adapters) == 2 * 2 * 2  # A and B of q_proj and v_proj in 2 layers
    nones = list(merged_lora_state(model, ((k, None) for k in model.state_dict())))  # a rank that only gathers
    assert [k for k, _ in nones] == list(merged) and all(v is None for _, v in nones)


def test_the_export_is_a_plain_instructblip_directory_transformers_generates_the_same_tokens_from(
        instruct_model, tmp_path):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    from blip2_ray.model.caption_end import caption_stop_ids
    from blip2_ray.weights.hf_export_stream import export_streamed
    from blip2_ray.weights.hf_format import load_stage2

    cfg, tok, qtok, model, *_ = instruct_model
    out = export_streamed(model, 2, merged_lora_state(model, model.state_dict().items()), str(tmp_path / "export"),
                          tok, cfg, qformer_tokenizer=qtok)
    hf = InstructBlipForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = InstructBlipProcessor.from_pretrained(out)
    from PIL import Image

    images = [Image.new("RGB", (32, 32), c) for c in ((200, 30, 30), (30, 30, 200))]
    greedy = dict(num_beams=1, max_new_tokens=6, min_new_tokens=6)
    ours, theirs = [], []
    for image, prompt in zip(images, PROMPTS):
        enc = processor(images=[image], text=[prompt], return_tensors="pt")  # both tokenizers read the prompt
        with torch.no_grad():
            ids = generate_text(model, tok, enc["pixel_values"], [prompt], qformer_tokenizer=qtok, **greedy)
            new = hf.generate(**enc, eos_token_id=caption_stop_ids(tok, "opt"), **greedy)[:, enc["input_ids"].shape[1]:]
        ours.append(ids[0])
        theirs.append(tok.decode(new[0], skip_special_tokens=True).strip())
        ours_ids = model.generate(enc["pixel_values"], *_prompt_ids(tok, prompt), question_ids=enc["qformer_input_ids"],
                                  question_mask=enc["qformer_attention_mask"],
                                  eos_token_id=caption_stop_ids(tok, "opt"), **greedy)
        assert ours_ids.tolist() == new.tolist()  # token for token
    assert ours == theirs and all(theirs)
    pixels = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")["pixel_values"]
    back = load_stage2(out, vision_dtype=torch.float32, llm_dtype=torch.float32).eval()
    assert back.takes_question and not any("lora" in k for k in back.state_dict())
    with torch.no_grad():
        again = generate_text(back, tok, pixels, PROMPTS[:1], qformer_tokenizer=qtok, **greedy)
    assert again == ours[:1]


def _prompt_ids(tok, prompt):
    enc = tok([prompt], return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def test_the_adapters_saved_alone_load_in_peft_on_the_base_llm(instruct_model, tmp_path):
    from peft import PeftModel

    cfg, tok, _, model, _, base_llm = instruct_model
    adapters = {}
    for _ in merged_lora_state(model, model.state_dict().items(), adapters):
        pass
    where = save_lora_adapter(str(tmp_path / "adapter"), adapters, model.llm_lora, model.language_model.config)
    base = build_stage2(cfg, tok).language_model
    base.load_state_dict(base_llm)
    ids = torch.tensor([tok("a red circle on a white background").input_ids])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        peft_llm = PeftModel.from_pretrained(base, where).eval()
        ours = model.language_model(input_ids=ids).logits
        assert torch.allclose(peft_llm(input_ids=ids).logits, ours, atol=1e-5)
        assert not torch.allclose(plain, ours, atol=1e-3)
