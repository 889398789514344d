"""`model.llm.kind: decoder` with tiny random Llama and Qwen2 directories saved by transformers (tokenizers of
the right kind built offline): loss masking, caption ends, BOS handling, left-padded batched generation,
VQA prompts, the HF export transformers generates with token-identically, and serving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blip2_ray.data.processor import tokenize_llm, vqa_prompt
from blip2_ray.model.caption_end import caption_stop_ids
from blip2_ray.model.config import model_config
from blip2_ray.model.language_model import padded_vocab
from blip2_ray.model.prompts import tokenize_prompts
from blip2_ray.weights.builders import build_stage2
from blip2_ray.weights.hf_format import export_stage2, load_stage2
from blip2_ray.weights.tokenizers import load_llm_tokenizer, prepends_bos

FAMILIES = ["llama", "qwen2"]


def save_tiny_llm(family: str, tok_dir: str, out, vocab_size: int | None = None) -> str:
    """A random LlamaForCausalLM / Qwen2ForCausalLM of tiny size, saved by transformers with its tokenizer
    (`vocab_size`: its rows; default: the tokenizer's length rounded up, with spare rows)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)  # as shipped: Llama has no pad token
    sizes = dict(vocab_size=vocab_size or padded_vocab(len(tok)), hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(7)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**sizes, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    else:  # Qwen2 base: <|endoftext|> is BOS, EOS and pad in its config, and its tokenizer prepends nothing
        eos = tok.eos_token_id
        model = Qwen2ForCausalLM(Qwen2Config(**sizes, bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=True))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module", params=FAMILIES)
def decoder_model(request, tmp_path_factory, tiny_tokenizers):
    family = request.param
    root = tmp_path_factory.mktemp(family)
    llm_dir = save_tiny_llm(family, tiny_tokenizers[family], root / "llm")
    cfg = model_config("tiny", llm={"kind": "decoder", "path": llm_dir})
    tok = load_llm_tokenizer(llm_dir)
    torch.manual_seed(0)
    model = build_stage2(cfg, tok).eval()
    export = export_stage2(model, str(root / "export"), tok, cfg)
    return family, cfg, tok, model, export


def _pixels(n=2, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_the_llm_and_its_family_come_from_the_directory(decoder_model):
    family, cfg, tok, model, _ = decoder_model
    assert model.llm_kind == "decoder" and model.llm_family == family
    assert type(model.language_model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    assert model.starts_with_bos == (family == "llama") == prepends_bos(tok)
    assert caption_stop_ids(tok, family) == [tok.eos_token_id]  # "\n" ends captions only for OPT


def test_captions_end_with_the_tokenizers_eos_and_start_as_the_tokenizer_does(decoder_model):
    family, cfg, tok, _, _ = decoder_model
    out = tokenize_llm(tok, ["a red circle", "a blue square on a white background"], 16, family)
    ids, mask = out["llm_input_ids"], out["llm_attention_mask"]
    for row, m, cap in zip(ids, mask, ["a red circle", "a blue square on a white background"]):
        n = int(m.sum())
        body = tok(cap, add_special_tokens=False).input_ids
        lead = [tok.bos_token_id] if family == "llama" else []
        assert row[:n].tolist() == lead + body + [tok.eos_token_id]
        assert (row[n:] == tok.pad_token_id).all() and not m[n:].any()


def test_loss_is_on_the_caption_tokens_only(decoder_model):
    family, cfg, tok, model, _ = decoder_model
    caps = ["a red circle", "a blue square on a white background"]
    enc = tokenize_llm(tok, caps, 16, family)
    ids, mask = torch.from_numpy(enc["llm_input_ids"]), torch.from_numpy(enc["llm_attention_mask"])
    x = _pixels()
    with torch.no_grad():
        ours = model(x, ids, mask).loss
        # the reference: the whole LLM on [visual prompt, text]; position nq+t-1 predicts text token t
        prefix = model.visual_prompt(x)
        nq = prefix.shape[1]
        embeds = torch.cat([prefix, model.llm_embeddings()(ids)], 1)
        full_mask = torch.cat([torch.ones(2, nq), mask], 1)
        logits = model.language_model(inputs_embeds=embeds, attention_mask=full_mask).logits
        labels = ids.masked_fill(mask == 0, -100)
        if family == "llama":
            labels[:, 0] = -100  # the BOS is not a caption token
        ref = F.cross_entropy(logits[:, nq - 1 : -1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=-100)
    assert abs(ours.item() - ref.item()) <= 1e-5


def test_a_training_prompt_goes_after_the_bos_and_gets_no_loss(decoder_model, tmp_path):
    family, cfg, tok, model, _ = decoder_model
    llm = {"kind": "decoder", "path": cfg.llm.path, "prompt": "a photo of"}
    prompted = build_stage2(model_config("tiny", llm=llm), tok)
    prompted.load_state_dict(model.state_dict())
    prompted.eval()
    p = tok("a photo of", add_special_tokens=False).input_ids
    assert prompted.prompt_ids[0].tolist() == p
    enc = tokenize_llm(tok, ["a red circle"], 16, family)
    ids, mask = torch.from_numpy(enc["llm_input_ids"]), torch.from_numpy(enc["llm_attention_mask"])
    lead = 1 if family == "llama" else 0
    full = torch.cat([ids[:, :lead], torch.tensor([p]), ids[:, lead:]], 1)
    full_mask = torch.cat([mask[:, :lead], torch.ones(1, len(p), dtype=mask.dtype), mask[:, lead:]], 1)
    x = _pixels(1)
    with torch.no_grad():
        got = prompted(x, ids, mask)
        prefix = prompted.visual_prompt(x)
        nq = prefix.shape[1]
        embeds = torch.cat([prefix, prompted.llm_embeddings()(full)], 1)
        logits = prompted.language_model(inputs_embeds=embeds,
                                         attention_mask=torch.cat([torch.ones(1, nq), full_mask], 1)).logits
        labels = full.masked_fill(full_mask == 0, -100)
        labels[:, : lead + len(p)] = -100
        ref = F.cross_entropy(logits[0, nq - 1 : -1], labels[0], ignore_index=-100)
    assert abs(got.loss.item() - ref.item()) <= 1e-5


def test_export_is_the_llms_own_config_and_transformers_generates_token_identically(decoder_model):
    from transformers import Blip2ForConditionalGeneration

    family, cfg, tok, model, export = decoder_model
    hf = Blip2ForConditionalGeneration.from_pretrained(export).eval()
    assert hf.config.text_config.model_type == family and hf.config.use_decoder_only_language_model
    assert hf.config.text_config.hidden_size == model.language_model.config.hidden_size
    x = _pixels(3, seed=1)
    nq, img = model.num_query_tokens, hf.config.image_token_index
    settings = dict(num_beams=1, max_new_tokens=8, min_new_tokens=3, eos_token_id=caption_stop_ids(tok, family),
                    do_sample=False, pad_token_id=tok.pad_token_id)
    ours = model.generate(x, **settings)
    start = [tok.bos_token_id] if model.starts_with_bos else []
    ids = torch.tensor([[img] * nq + start] * 3)
    theirs = hf.generate(pixel_values=x, input_ids=ids, **settings)[:, ids.shape[1]:]
    assert ours.tolist() == theirs.tolist()
    # with left-padded VQA prompts of different lengths, as the serving / eval paths batch them
    questions = ["what color is it?", "what shape is the object in the picture?", "how many?"]
    prompts = [vqa_prompt(q, "decoder") for q in questions]
    p_ids, p_mask = tokenize_prompts(tok, prompts, 3, "decoder")
    ours = model.generate(x, p_ids, p_mask, **settings)
    hf_ids = torch.cat([torch.full((3, nq), img), p_ids], 1)
    hf_mask = torch.cat([torch.ones(3, nq, dtype=p_mask.dtype), p_mask], 1)
    theirs = hf.generate(pixel_values=x, input_ids=hf_ids, attention_mask=hf_mask, **settings)[:, hf_ids.shape[1]:]
    assert ours.tolist() == theirs.tolist()


def test_a_vocabulary_without_a_spare_row_grows_one_for_the_image_token(tiny_tokenizers, tmp_path):
    """Llama-2's vocabulary is exactly its tokenizer's: the export adds the <image> token and resizes the LLM's
    embeddings and head to a multiple of 64 (as transformers' conversion does); transformers loads the export and
    generates what ours does; load_stage2 reads it back."""
    from transformers import AutoTokenizer, Blip2ForConditionalGeneration

    n = len(AutoTokenizer.from_pretrained(tiny_tokenizers["llama"]))
    llm_dir = save_tiny_llm("llama", tiny_tokenizers["llama"], tmp_path / "llm", vocab_size=n)
    cfg = model_config("tiny", llm={"kind": "decoder", "path": llm_dir})
    tok = load_llm_tokenizer(llm_dir)
    torch.manual_seed(0)
    model = build_stage2(cfg, tok).eval()
    assert model.llm_embeddings().num_embeddings == n and "<image>" not in tok.get_vocab()
    export = export_stage2(model, str(tmp_path / "export"), tok, cfg)
    hf = Blip2ForConditionalGeneration.from_pretrained(export).eval()
    rows = -(-(n + 1) // 64) * 64
    assert hf.config.image_token_index == n and hf.config.text_config.vocab_size == rows
    assert hf.language_model.get_input_embeddings().weight.shape[0] == rows
    assert hf.language_model.get_output_embeddings().weight.shape[0] == rows  # Llama's head is not tied
    x = _pixels(2, seed=3)
    settings = dict(num_beams=1, max_new_tokens=6, min_new_tokens=2, eos_token_id=caption_stop_ids(tok, "llama"),
                    do_sample=False, pad_token_id=tok.pad_token_id)
    ids = torch.tensor([[n] * model.num_query_tokens + [tok.bos_token_id]] * 2)
    theirs = hf.generate(pixel_values=x, input_ids=ids, **settings)[:, ids.shape[1]:]
    assert model.generate(x, **settings).tolist() == theirs.tolist()
    loaded = load_stage2(export, vision_dtype="float32", llm_dtype=torch.float32)
    assert loaded.llm_embeddings().num_embeddings == rows


def test_left_padded_batched_prompts_equal_one_at_a_time(decoder_model):
    family, cfg, tok, model, _ = decoder_model
    x = _pixels(2, seed=2)
    prompts = [vqa_prompt("what color is the circle?", "decoder"), vqa_prompt("how many?", "decoder")]
    assert tok("x").input_ids[0] == tok.bos_token_id if family == "llama" else tok.bos_token_id is None
    settings = dict(num_beams=1, max_new_tokens=6, min_new_tokens=2, eos_token_id=caption_stop_ids(tok, family))
    ids, mask = tokenize_prompts(tok, prompts, 2, "decoder")
    assert (mask.sum(1) < mask.shape[1]).any() and (mask.diff(dim=1) >= 0).all()  # one row padded, on the left
    batched = model.generate(x, ids, mask, **settings).tolist()
    for i in range(2):
        one_ids, one_mask = tokenize_prompts(tok, [prompts[i]], 1, "decoder")
        single = model.generate(x[i : i + 1], one_ids, one_mask, **settings).tolist()[0]
        n = len(single)
        assert batched[i][:n] == single and all(t == tok.pad_token_id for t in batched[i][n:])


def test_load_stage2_reads_the_export_back(decoder_model):
    family, cfg, tok, model, export = decoder_model
    loaded = load_stage2(export, vision_dtype="float32", llm_dtype=torch.float32).eval()
    assert loaded.llm_family == family and loaded.starts_with_bos == model.starts_with_bos
    x = _pixels()
    assert torch.allclose(loaded.visual_prompt(x), model.visual_prompt(x), atol=1e-6)


def test_the_caption_deployment_serves_it_as_generate_does(decoder_model):
    """Served step-wise (left-padded rows of different prompt lengths, rows joining a running batch, a VQA
    question worded by the replica), eager and compiled, == `Blip2Stage2.generate` of the same model, token for
    token."""
    import asyncio

    from blip2_ray.serve.engine import GenerationEngine
    from blip2_ray.serve.models import CaptionDeployment

    family, cfg, tok, model, export = decoder_model
    dep = CaptionDeployment(export, max_batch_size=4, batch_wait_timeout_s=0)
    torch.manual_seed(3)
    with torch.no_grad():  # larger random weights: outputs that change with the context (a wrong position shows)
        for p in list(dep.model.language_model.parameters()) + list(dep.model.language_projection.parameters()):
            if p.dim() == 2:
                p.normal_(0, 1.0)

    def item(seed, prompt="", question=False, max_new=8, min_new=1):
        pixels = (np.random.RandomState(seed).rand(3, 32, 32) * 255).astype(np.uint8)
        return {"pixel_values": pixels, "prompt": prompt, "question": question, "max_new_tokens": max_new,
                "min_new_tokens": min_new, "num_beams": 1, "temperature": 0.0}

    def reference(it):
        prompt = vqa_prompt(it["prompt"], "decoder") if it["question"] else it["prompt"]
        ids, mask = tokenize_prompts(dep.tokenizer, [prompt] if prompt else None, 1, "decoder")
        eos = dep.engine.eos_ids
        out = dep.model.generate(dep.engine.preprocess(it["pixel_values"][None]), ids, mask, num_beams=1,
                                 max_new_tokens=it["max_new_tokens"], min_new_tokens=it["min_new_tokens"],
                                 eos_token_id=eos)[0].tolist()
        stop = next((j for j, t in enumerate(out) if t in eos), None)
        return out if stop is None else out[: stop + 1]

    items = [item(0, max_new=12, min_new=12), item(1, "what color is it?", question=True),
             item(2, "a photo of"), item(3, "a picture of two red", max_new=6, min_new=3), item(4, max_new=5)]

    async def run():
        first = [asyncio.ensure_future(dep.generate(it)) for it in items[:2]]
        while dep.engine.counters["steps"] < 3:
            await asyncio.sleep(0.001)
        later = [asyncio.ensure_future(dep.generate(it)) for it in items[2:]]  # join the running batch
        return await asyncio.gather(*first, *later)

    results = asyncio.run(run())
    assert max(r["batch_size"] for r in results[2:]) >= 3
    assert len({t for r in results for t in r["token_ids"]}) >= 6  # varied outputs: a wrong cache would show
    for it, r in zip(items, results):
        assert r["token_ids"] == reference(it), it["prompt"]
        assert r["finish_reason"] == ("stop" if r["token_ids"][-1] in dep.engine.eos_ids else "length")

    # the same requests through the compiled decode step (traced and functionalised: backend aot_eager)
    compiled = GenerationEngine(dep.model, dep.tokenizer, dep.engine.eos_ids, dep.engine.preprocess,
                                max_batch_size=4, batch_wait_timeout_s=0, capture="compile",
                                compile_backend="aot_eager")
    assert compiled.stats()["decode_step"] == "compile", compiled.slots.capture_error

    async def run_compiled():
        first = [compiled.submit(dep._prompted(it)) for it in items[:2]]
        while compiled.counters["steps"] < 3:
            await asyncio.sleep(0.001)
        later = [compiled.submit(dep._prompted(it)) for it in items[2:]]
        return [await r.result() for r in first + later]

    for it, r in zip(items, asyncio.run(run_compiled())):
        assert r["token_ids"] == reference(it), it["prompt"]


# ------------------------------------------------------------------------------------- device_map
@pytest.fixture(scope="module")
def tiny_opt_export(tmp_path_factory, tiny_tokenizers) -> str:
    """A random tiny stage-2 model (OPT) exported in HF format."""
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    cfg = model_config("tiny")
    tok = llm_tokenizer(cfg)
    torch.manual_seed(0)
    return export_stage2(build_stage2(cfg, tok), str(tmp_path_factory.mktemp("tiny_opt") / "export"), tok, cfg)


@pytest.mark.parametrize("device_map", [None, {"": "cpu"}, {"model": "cpu", "lm_head": "cpu"}])
def test_load_stage2_places_the_language_model_by_device_map(tiny_opt_export, device_map):
    ref = load_stage2(tiny_opt_export, vision_dtype="float32", llm_dtype="float32").eval()
    model = load_stage2(tiny_opt_export, vision_dtype="float32", llm_dtype="float32", device_map=device_map)
    model.eval()
    x = _pixels()
    settings = dict(num_beams=1, max_new_tokens=4)
    assert model.generate(x, **settings).tolist() == ref.generate(x, **settings).tolist()


def test_a_device_map_that_leaves_parameters_unplaced_is_an_error(tiny_opt_export):
    from blip2_ray.errors import UserError

    with pytest.raises(UserError, match=r"places no device for \['model.decoder"):
        load_stage2(tiny_opt_export, llm_dtype="float32", device_map={"lm_head": "cpu"})
