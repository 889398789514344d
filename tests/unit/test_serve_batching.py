"""CaptionDeployment's batch logic without Ray: grouping by settings, and batched == one at a time."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module", params=["tiny", "tiny_t5"])
def deployment(request, tmp_path_factory):
    import torch

    from blip2_ray.model.builders import build_stage2
    from blip2_ray.model.config import model_config
    from blip2_ray.model.hf_format import export_stage2
    from blip2_ray.model.tokenizer_paths import llm_tokenizer
    from blip2_ray.serve.models import CaptionDeployment

    torch.manual_seed(0)
    cfg = model_config(request.param)
    tok = llm_tokenizer(cfg)
    out = export_stage2(build_stage2(cfg, tok), str(tmp_path_factory.mktemp(request.param)), tok, cfg)
    return CaptionDeployment(out)


def item(seed: int, prompt: str = "", max_new_tokens: int = 6, num_beams: int = 1) -> dict:
    pixels = np.random.RandomState(seed).randn(3, 32, 32).astype(np.float32)
    return {"pixel_values": pixels, "prompt": prompt, "max_new_tokens": max_new_tokens, "min_new_tokens": 1,
            "num_beams": num_beams, "temperature": 0.0}


def test_batched_equals_one_at_a_time(deployment):
    items = [item(0), item(1, "a photo of"), item(2, "a picture of two"), item(3, max_new_tokens=4),
             item(4, num_beams=2), item(5)]
    batched = deployment._run(items)
    assert all(r["batch_size"] == len(items) for r in batched)
    assert [r["group_size"] for r in batched] == [2, 2, 2, 1, 1, 2]
    for it, b in zip(items, batched):
        single = deployment._run([it])[0]
        assert b["token_ids"] == single["token_ids"]
        assert b["text"] == single["text"]
        assert b["completion_tokens"] <= it["max_new_tokens"]
        assert b["finish_reason"] in ("stop", "length")
