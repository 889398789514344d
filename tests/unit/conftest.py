"""Fixtures shared by unit test modules."""

import pytest
import torch


@pytest.fixture(scope="module", params=["tiny", "tiny_t5"])
def varied_stage2(request):
    """(model, tokenizer, eos ids) of a tiny stage-2 model (OPT, then T5) whose LLM and projection have larger
    random weights, so that generated tokens change with the context (the tiny init repeats one token)."""
    from blip2_ray.model.builders import build_stage2
    from blip2_ray.model.config import model_config
    from blip2_ray.model.tokenizer_paths import llm_tokenizer
    from blip2_ray.model.tokenizers import caption_stop_ids

    torch.manual_seed(0)
    cfg = model_config(request.param)
    tok = llm_tokenizer(cfg)
    model = build_stage2(cfg, tok).eval()
    with torch.no_grad():
        for p in list(model.language_model.parameters()) + list(model.language_projection.parameters()):
            if p.dim() == 2:
                p.normal_(0, 1.0)
    return model, tok, caption_stop_ids(tok, model.llm_family)
