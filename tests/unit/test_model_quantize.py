"""Weight-only int8 of the LLM (model/quantize.py): per-channel scales, the tied head untouched, bytes, and the
engine decoding the quantised model as its own `generate` does."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from blip2_ray.model.quantize import Int8Linear, llm_weight_bytes, quantize_llm


def test_int8_linear_is_per_channel_and_close():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight[3] *= 100  # one loud row: per-channel scales keep the others precise
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.scale.shape == (48,) and q.weight.abs().max() == 127
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    ref = linear(x).float()
    got = q(x).float()
    err = (got - ref).abs().amax(0) / ref.abs().amax(0)
    assert err.max() < 0.03, err.max()  # per output channel, relative to its own range


def test_quantize_llm_halves_the_blocks_and_keeps_the_tied_head(tiny_tokenizers):
    from blip2_ray.model.config import model_config
    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    cfg = model_config("tiny", llm={"dtype": "bfloat16"})
    tok = llm_tokenizer(cfg)
    model = build_stage2(cfg, tok).eval()
    lm = model.language_model
    layer = lm.model.decoder.layers[0]
    before, layer_before = llm_weight_bytes(lm), llm_weight_bytes(layer)
    n = quantize_llm(lm, "int8")
    assert n == 6 * cfg.llm.num_layers  # q, k, v, out, fc1, fc2 of each block
    assert lm.lm_head.weight is lm.get_input_embeddings().weight  # tied: still the bf16 embedding table
    assert llm_weight_bytes(layer) / layer_before < 0.55 and llm_weight_bytes(lm) < before
    assert quantize_llm(lm, "none") == 0


def test_the_engine_decodes_the_int8_model_as_its_generate_does(varied_stage2):
    import copy

    from blip2_ray.model.prompts import tokenize_prompts
    from blip2_ray.serve.engine import GenerationEngine

    model, tok, eos = varied_stage2
    model = copy.deepcopy(model)
    quantize_llm(model.language_model, "int8")
    eng = GenerationEngine(model, tok, eos, lambda px: torch.from_numpy(px), batch_wait_timeout_s=0)
    px = np.random.RandomState(3).randn(3, 32, 32).astype(np.float32)
    it = {"pixel_values": px, "prompt": "a photo of", "max_new_tokens": 6, "min_new_tokens": 6, "num_beams": 1,
          "temperature": 0.0}

    async def run():
        return (await eng.submit(it).result())["token_ids"]

    got = asyncio.run(run())
    ids, mask = tokenize_prompts(tok, ["a photo of"], 1, model.llm_kind)
    expected = model.generate(torch.from_numpy(px)[None], ids, mask, num_beams=1, max_new_tokens=6, min_new_tokens=6,
                              eos_token_id=eos)[0].tolist()
    assert got == expected[: len(got)] and len(got) >= 1
