"""CaptionDeployment without Ray: uint8 pixels in, concurrent requests batched, each answer what it is alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest


@pytest.fixture(scope="module", params=["tiny", "tiny_t5"])
def deployment(request, tmp_path_factory):
    import torch

    from blip2_ray.model.config import model_config
    from blip2_ray.serve.models import CaptionDeployment
    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.hf_format import export_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    torch.manual_seed(0)
    cfg = model_config(request.param)
    tok = llm_tokenizer(cfg)
    out = export_stage2(build_stage2(cfg, tok), str(tmp_path_factory.mktemp(request.param)), tok, cfg)
    return CaptionDeployment(out, max_batch_size=4, batch_wait_timeout_s=0.01)


def item(seed: int, prompt: str = "", max_new_tokens: int = 6, num_beams: int = 1) -> dict:
    pixels = (np.random.RandomState(seed).rand(3, 32, 32) * 255).astype(np.uint8)
    return {"pixel_values": pixels, "prompt": prompt, "max_new_tokens": max_new_tokens, "min_new_tokens": 1,
            "num_beams": num_beams, "temperature": 0.0}


def test_concurrent_requests_equal_one_at_a_time(deployment):
    items = [item(0), item(1, "a photo of"), item(2, "a picture of two"), item(3, max_new_tokens=4),
             item(4, num_beams=2), item(5)]

    async def together():
        return await asyncio.gather(*(deployment.generate(it) for it in items))

    async def alone(it):
        return await deployment.generate(it)

    batched = asyncio.run(together())
    assert max(r["batch_size"] for r in batched) == 4  # max_batch_size rows decode together
    for it, b in zip(items, batched):
        single = asyncio.run(alone(it))
        assert single["batch_size"] == 1
        assert b["token_ids"] == single["token_ids"] and b["text"] == single["text"]
        assert b["completion_tokens"] <= it["max_new_tokens"] and b["finish_reason"] in ("stop", "length")


def test_stream_and_too_long_prompt(deployment):
    """A request beyond the KV-cache slot (prompt + max_new_tokens) is a 400 at submit, for OPT's learned positions
    and T5's relative ones alike (the slot is bounded by max_seq_len): nothing is generated for it."""
    async def run():
        parts = [p async for p in deployment.generate_stream(item(6, "a photo of", max_new_tokens=8))]
        whole = await deployment.generate(item(6, "a photo of", max_new_tokens=8))
        too_long = await deployment.generate(item(7, max_new_tokens=10_000))
        return parts, whole, too_long

    parts, whole, too_long = asyncio.run(run())
    assert parts[-1]["done"]["token_ids"] == whole["token_ids"]
    assert "".join(p["delta"] for p in parts) == whole["text"]
    assert too_long["error"][0] == 400 and "KV-cache slot" in too_long["error"][2], too_long
    assert deployment.stats()["running"] == 0
