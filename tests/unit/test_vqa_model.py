"""The question-aware Q-Former of VQA fine-tuning: built from a stage-2 model plus a stage-1 text path, trained
on the answer tokens only, exported as InstructBlipForConditionalGeneration with the same outputs there."""

from __future__ import annotations

import pytest
import torch

from blip2_ray.errors import UserError
from blip2_ray.model.config import model_config
from blip2_ray.model.prompts import generate_text
from blip2_ray.weights.builders import build_stage1, build_stage2
from blip2_ray.weights.hf_format import export_stage1, export_stage2, load_stage2
from blip2_ray.weights.question_encoder import make_question_aware
from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer

QUESTIONS = ["Question: what colour is the shape? Answer:", "Question: which shape is it? Answer:"]


@pytest.fixture(scope="module")
def vqa_model(tmp_path_factory, tiny_tokenizers):
    torch.manual_seed(0)
    cfg = model_config("tiny")
    stage1 = build_stage1(cfg)
    s1_dir = export_stage1(stage1, str(tmp_path_factory.mktemp("s1")), qformer_tokenizer(cfg), cfg)
    tok = llm_tokenizer(cfg)
    model = build_stage2(cfg, tok).eval()
    queries_only = {k: v.clone() for k, v in model.qformer.state_dict().items()}
    make_question_aware(model, s1_dir)
    return cfg, tok, qformer_tokenizer(cfg), model, stage1, queries_only, s1_dir


def _pixels(cfg, n=2, seed=0):
    s = cfg.vision.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _questions(qtok, n=2):
    enc = qtok(QUESTIONS[:n], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    return enc.input_ids, enc.attention_mask


def test_the_question_aware_qformer_keeps_the_stage2_weights_and_takes_the_stage1_text_path(vqa_model):
    cfg, _, _, model, stage1, queries_only, _ = vqa_model
    assert model.takes_question
    state = model.qformer.state_dict()
    assert torch.equal(state["embeddings.layernorm.weight"], queries_only["layernorm.weight"])
    for k, v in queries_only.items():
        if not k.startswith("layernorm."):
            assert torch.equal(state[k], v), k
    s1 = stage1.state_dict()
    assert torch.equal(state["embeddings.word_embeddings.weight"], s1["embeddings.word_embeddings.weight"])
    assert torch.equal(state["encoder.layer.1.output.dense.weight"], s1["qformer.encoder.layer.1.output.dense.weight"])
    assert all(p.dtype == torch.float32 for p in model.qformer.parameters())


def test_the_question_changes_the_visual_prompt_and_padding_does_not(vqa_model):
    cfg, _, qtok, model, *_ = vqa_model
    x = _pixels(cfg)
    ids, mask = _questions(qtok)
    with torch.no_grad():
        a = model.visual_prompt(x, ids, mask)
        b = model.visual_prompt(x, ids.flip(0), mask.flip(0))
        short = qtok(QUESTIONS[:2], padding="longest", return_tensors="pt")
        c = model.visual_prompt(x, short.input_ids, short.attention_mask)
    assert (a - b).abs().max() > 1e-4  # each image's queries read its own question
    assert torch.allclose(a, c, atol=1e-5)  # padded question tokens are masked out


def test_vqa_loss_counts_only_the_answer_tokens(vqa_model):
    cfg, tok, qtok, model, *_ = vqa_model
    x = _pixels(cfg)
    ids, mask = _questions(qtok)
    prompt = tok(QUESTIONS[0]).input_ids
    answer = tok(" red", add_special_tokens=False).input_ids + tok("\n", add_special_tokens=False).input_ids
    row = torch.tensor([prompt + answer])
    lengths = torch.tensor([len(prompt)])
    with torch.no_grad():
        out = model(x[:1], row, torch.ones_like(row), prompt_lengths=lengths, question_ids=ids[:1],
                    question_mask=mask[:1])
    logits = out.logits[0]  # row t predicts token t
    reference = torch.nn.functional.cross_entropy(logits[len(prompt):], row[0, len(prompt):])
    assert torch.allclose(out.loss, reference, atol=1e-6)


def test_the_vqa_export_loads_in_transformers_instructblip_with_the_same_logits(vqa_model, tmp_path):
    from transformers import InstructBlipForConditionalGeneration, InstructBlipProcessor

    cfg, tok, qtok, model, *_ = vqa_model
    out = export_stage2(model, str(tmp_path / "vqa"), tok, cfg, qformer_tokenizer=qtok)
    hf = InstructBlipForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = InstructBlipProcessor.from_pretrained(out)
    assert processor.qformer_tokenizer.vocab == qtok.vocab
    x = _pixels(cfg)
    ids, mask = _questions(qtok)
    enc = tok(["Question: what colour is the shape? Answer: red\n", "Question: which shape? Answer: a circle\n"],
              padding="longest", return_tensors="pt")
    nq = cfg.qformer.num_query_tokens
    img = hf.config.image_token_index
    with torch.no_grad():
        ours = model(x, enc.input_ids, enc.attention_mask, question_ids=ids, question_mask=mask).logits
        theirs = hf(pixel_values=x, qformer_input_ids=ids, qformer_attention_mask=mask,
                    input_ids=torch.cat([torch.full((2, nq), img), enc.input_ids], 1),
                    attention_mask=torch.cat([torch.ones(2, nq, dtype=torch.long), enc.attention_mask], 1)
                    ).logits[:, nq - 1: -1]
    assert (ours - theirs).abs().max().item() <= 1e-4

    back = load_stage2(out, vision_dtype=torch.float32, llm_dtype=torch.float32).eval()
    assert back.takes_question
    greedy = dict(num_beams=1, max_new_tokens=5, min_new_tokens=1)
    with torch.no_grad():
        assert generate_text(back, tok, x, QUESTIONS, qformer_tokenizer=qtok, **greedy) == \
            generate_text(model, tok, x, QUESTIONS, qformer_tokenizer=qtok, **greedy)


def test_a_text_path_source_without_text_embeddings_is_one_clear_error(vqa_model, tmp_path):
    cfg, tok, *_ = vqa_model
    stage2_dir = export_stage2(build_stage2(cfg, tok), str(tmp_path / "s2"), tok, cfg)
    with pytest.raises(UserError, match="stage-2"):
        make_question_aware(build_stage2(cfg, tok), stage2_dir)


def test_a_queries_only_model_refuses_a_question(vqa_model):
    cfg, tok, qtok, *_ = vqa_model
    ids, mask = _questions(qtok)
    with pytest.raises(ValueError, match="reads no text"):
        build_stage2(cfg, tok).visual_prompt(_pixels(cfg), ids, mask)


def test_flan_t5_vqa_reads_the_prompt_in_the_encoder_and_learns_only_the_answer(tiny_tokenizers):
    from blip2_ray.data.processor import tokenize_vqa_llm

    torch.manual_seed(0)
    cfg = model_config("tiny_t5")
    tok = llm_tokenizer(cfg)
    model = build_stage2(cfg, tok).eval()
    prompt = "Question: what shape is it? Short answer:"
    row = tokenize_vqa_llm(tok, [prompt], ["circle"], 24, "t5")
    x = _pixels(cfg, n=1)
    with torch.no_grad():
        out = model(x, torch.from_numpy(row["llm_input_ids"]), torch.from_numpy(row["llm_attention_mask"]),
                    prompt_lengths=torch.from_numpy(row["llm_prompt_length"]))
        prefix = model.visual_prompt(x)
        enc = tok([prompt], return_tensors="pt").input_ids
        labels = tok(["circle"], return_tensors="pt").input_ids
        embeds = torch.cat([prefix, model.llm_embeddings()(enc)], 1)
        reference = model.language_model(inputs_embeds=embeds, labels=labels).loss
    assert torch.allclose(out.loss, reference, atol=1e-5)


def test_the_vqa_export_is_served_with_the_question_in_its_qformer(vqa_model, tmp_path):
    """/v1/vqa and chat reach the caption deployment as {"prompt", "question": True}: the replica words the
    question with the VQA prompt, which both the LLM and the question-aware Q-Former read (InstructBLIP's
    processor semantics, as VQA training tokenises it); tokens == generate with the same inputs."""
    import asyncio

    import numpy as np

    from blip2_ray.data.processor import vqa_prompt
    from blip2_ray.model.prompts import tokenize_prompts, tokenize_questions
    from blip2_ray.serve.models import CaptionDeployment

    cfg, tok, qtok, model, *_ = vqa_model
    out = export_stage2(model, str(tmp_path / "vqa"), tok, cfg, qformer_tokenizer=qtok)
    dep = CaptionDeployment(out, max_batch_size=2, batch_wait_timeout_s=0)
    assert dep.engine.question_max_len == cfg.qformer.max_text_len
    seen = []
    visual_prompt = dep.model.visual_prompt

    def spy(px, q_ids=None, q_mask=None):
        seen.append(q_ids)
        return visual_prompt(px, q_ids, q_mask)

    dep.model.visual_prompt = spy

    def item(seed, question):
        px = (np.random.RandomState(seed).rand(3, 32, 32) * 255).astype(np.uint8)
        return {"pixel_values": px, "prompt": question, "question": True, "max_new_tokens": 5, "min_new_tokens": 1,
                "num_beams": 1, "temperature": 0.0}

    items = [item(0, "what colour is the shape?"), item(1, "which shape is it?")]

    async def run():
        return await asyncio.gather(*(dep.generate(it) for it in items))

    results = asyncio.run(run())
    assert seen and all(q is not None for q in seen)  # the prefill gave the Q-Former the question
    for it, r in zip(items, results):
        prompt = vqa_prompt(it["prompt"], "decoder")
        ids, mask = tokenize_prompts(tok, [prompt], 1, "decoder")
        q_ids, q_mask = tokenize_questions(qtok, [prompt], cfg.qformer.max_text_len)
        px = dep.engine.preprocess(it["pixel_values"][None])
        expected = model.generate(px, ids, mask, num_beams=1, max_new_tokens=5, min_new_tokens=1,
                                  eos_token_id=dep.engine.eos_ids, question_ids=q_ids, question_mask=q_mask)[0].tolist()
        stop = next((j for j, t in enumerate(expected) if t in dep.engine.eos_ids), None)
        assert r["token_ids"] == (expected if stop is None else expected[: stop + 1])
