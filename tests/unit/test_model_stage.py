"""Stage models: the ITG mask seen through outputs, frozen parts really frozen, both stages run."""

from __future__ import annotations

import pytest
import torch

from blip2_ray.model.config import model_config
from blip2_ray.model.prefix_lm import prefix_lm_split
from blip2_ray.weights.builders import build_stage1, build_stage2
from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer


@pytest.fixture(scope="module")
def stage1(tiny_tokenizers):
    torch.manual_seed(0)
    cfg = model_config("tiny")
    tok = qformer_tokenizer(cfg)
    return cfg, tok, build_stage1(cfg, tok).eval()


def _itg_hidden(model, image, ids, mask):
    _, cache = model.query_pass(model.image_keys_values(image), keep_kv=True)
    return model.itg_hidden(cache, ids, mask)


def test_itg_attention_text_sees_queries_and_its_past_only(stage1):
    cfg, tok, model = stage1
    image = model.encode_image(torch.randn(1, 3, 32, 32))
    ids = tok(["a red circle above a blue square"], return_tensors="pt").input_ids
    mask = torch.ones_like(ids)
    t = 4  # change the text token at position t
    ids2 = ids.clone()
    ids2[0, t] = tok.convert_tokens_to_ids("green")
    with torch.no_grad():
        h1, h2 = _itg_hidden(model, image, ids, mask), _itg_hidden(model, image, ids2, mask)
    assert torch.allclose(h1[:, :t], h2[:, :t], atol=1e-6)  # text < t does not see t
    assert not torch.allclose(h1[:, t:], h2[:, t:], atol=1e-4)  # text >= t does
    # padding is never seen: a padded copy gives the same states at the real positions
    padded = torch.cat([ids, torch.zeros_like(ids[:, :3])], 1)
    with torch.no_grad():
        h_pad = _itg_hidden(model, image, padded, torch.cat([mask, torch.zeros_like(mask[:, :3])], 1))
    assert torch.allclose(h1, h_pad[:, : ids.shape[1]], atol=1e-5)
    # and text does see the queries: another image changes every text position
    image2 = model.encode_image(torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        h3 = _itg_hidden(model, image2, ids, mask)
    assert (h1 - h3).abs().amax(-1).gt(1e-6).all()


def _frozen_names(model):
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("stage", [1, 2])
def test_frozen_parts_stay_frozen_and_ln_vision_trains(stage, tiny_tokenizers):
    torch.manual_seed(0)
    cfg = model_config("tiny")
    if stage == 1:
        tok = qformer_tokenizer(cfg)
        model = build_stage1(cfg, tok)
        enc = tok(["a red circle", "a blue square", "a green star"], padding="longest", return_tensors="pt")
        batch = lambda x: model(x, enc.input_ids, enc.attention_mask).loss  # noqa: E731
    else:
        tok = llm_tokenizer(cfg)
        model = build_stage2(cfg, tok)
        enc = tok(["a red circle\n", "a blue square\n", "a green star\n"], padding="longest", return_tensors="pt")
        batch = lambda x: model(x, enc.input_ids, enc.attention_mask).loss  # noqa: E731
    model.train()
    frozen = _frozen_names(model)
    assert frozen, "nothing is frozen"
    assert all(n.startswith(("vision_model.", "language_model.")) for n in frozen)
    assert "vision_model.post_layernorm.weight" not in frozen
    assert not model.vision_model.training  # frozen modules stay in eval mode under .train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = batch(torch.randn(3, 3, 32, 32))
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None, n
            assert torch.equal(p, before[n]), n
    assert not torch.equal(model.vision_model.post_layernorm.weight, before["vision_model.post_layernorm.weight"])
    assert not torch.equal(model.query_tokens, before["query_tokens"])


def test_stage1_reports_each_loss_component(stage1):
    cfg, tok, model = stage1
    enc = tok(["a red circle", "a blue square", "a green star", "a cyan ring"], padding="longest", return_tensors="pt")
    out = model(torch.randn(4, 3, 32, 32), enc.input_ids, enc.attention_mask,
                generator=torch.Generator().manual_seed(0))
    c = out.components()
    assert set(c) == {"loss", "loss_itc", "loss_itm", "loss_itg"}
    assert c["loss"] == pytest.approx(c["loss_itc"] + c["loss_itm"] + c["loss_itg"], rel=1e-5)
    assert all(v == v and v > 0 for v in c.values())


def test_prefix_lm_split_bounds_and_reassembly():
    torch.manual_seed(0)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 1, 0], [5, 6, 1, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    seen = set()
    for s in range(50):
        enc, emask, labels = prefix_lm_split(ids, mask, eos_id=1, pad_id=0, generator=torch.Generator().manual_seed(s))
        for b in range(2):
            n = int(mask[b].sum()) - 1  # caption tokens without </s>
            k = int(emask[b].sum()) - 1
            assert 1 <= k <= max(1, n // 2)
            seen.add((b, k))
            assert enc[b, k] == 1  # prefix ends with </s>
            target = [int(v) for v in labels[b] if v != -100]
            # prefix + target = the caption with its </s>
            assert [int(v) for v in enc[b, :k]] + target == [int(v) for v in ids[b, : n + 1]]
    assert {k for b, k in seen if b == 0} == {1, 2, 3}  # every split point in range is drawn
