"""The stage-1 step (cached ITG, image keys/values shared by ITC and ITM, negatives gathered without
gradient, LM head on labelled positions only) against the formulation it replaced, written out here:
every pass through transformers' own `Blip2QFormerLayer.forward`, ITG re-running the queries under
a combined mask, ITM negatives gathered after ln_vision with gradient, the LM head on every position.
Eval mode (no dropout) and fixed negatives; losses and the gradient of every trainable parameter are
compared at world size 1 and at world size 2 (two gloo processes), in float64 to 1e-9 (the two differ
only by rounding; in float32 a sum with cancellation such as temp's gradient shows it at ~3e-4) and in
float32 to 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from blip2_ray.model import losses
from blip2_ray.model.config import model_config
from blip2_ray.model.qformer import run_qformer
from blip2_ray.weights.builders import build_stage1
from blip2_ray.weights.tokenizer_paths import qformer_tokenizer

CAPTIONS = ["a red circle", "a blue square on a white background", "a green star", "two cyan rings on grey",
            "a black triangle", "a small yellow square next to a big one", "an orange star", "a ring"]
RTOL = {torch.float32: 1e-5, torch.float64: 1e-9}


# ------------------------------------------------------------------ the replaced formulation (reference)
def additive_mask(allowed: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (~allowed).to(dtype) * torch.finfo(dtype).min


def reference_itg_mask(nq: int, text_mask: torch.Tensor, dtype) -> torch.Tensor:
    """(B, 1, Q+T, Q+T): queries see queries; text t sees all queries and non-padding text <= t."""
    b, t = text_mask.shape
    n = nq + t
    allowed = torch.zeros(b, n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            allowed[:, i, j] = (j < nq) if i < nq else (j < nq or j <= i)
    key_ok = torch.cat([torch.ones(b, nq, dtype=torch.bool), text_mask.bool()], 1)
    return additive_mask(allowed & key_ok[:, None, :], dtype)[:, None]


def reference_step(model, pixel_values, ids, mask, rank=0, gather=losses.identity_gather,
                   gather_with_grad=losses.identity_gather):
    """The stage-1 loss as before: returns (loss, itc, itm, itg)."""
    ls = model.cfg.qformer.label_smoothing
    qf, nq, b, dtype = model.qformer, model.query_tokens.shape[1], ids.shape[0], model.temp.dtype
    image = model.encode_image(pixel_values)
    queries = model.query_tokens.expand(b, -1, -1)

    # ITC
    query_out = run_qformer(qf, queries, None, image, query_length=nq)
    image_feats = F.normalize(model.vision_projection(query_out), dim=-1)
    text_out = run_qformer(qf, model.embeddings(input_ids=ids), additive_mask(mask.bool(), dtype)[:, None, None, :])
    text_feat = F.normalize(model.text_projection(text_out[:, 0]), dim=-1)
    image_all, text_all = gather(image_feats.detach()), gather(text_feat.detach())
    sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, text_all).amax(-1) / model.temp
    sim_t2i = torch.einsum("be,nqe->bnq", text_feat, image_all).amax(-1) / model.temp
    targets = torch.arange(b) + rank * b
    itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=ls)
           + F.cross_entropy(sim_t2i, targets, label_smoothing=ls)) / 2

    # ITM: negative images gathered after ln_vision, with gradient
    neg_img, neg_txt = losses.sample_hard_negatives(sim_i2t, sim_t2i, rank)
    image_world, ids_world, mask_world = gather_with_grad(image), gather(ids), gather(mask)
    itm_images = torch.cat([image, image_world[neg_img], image])
    itm_ids = torch.cat([ids, ids, ids_world[neg_txt]])
    itm_mask = torch.cat([mask, mask, mask_world[neg_txt]])
    embeds = model.embeddings(input_ids=itm_ids, query_embeds=model.query_tokens.expand(3 * b, -1, -1))
    keep = torch.cat([torch.ones(3 * b, nq, dtype=torch.bool), itm_mask.bool()], 1)
    h = run_qformer(qf, embeds, additive_mask(keep, dtype)[:, None, None, :], itm_images, query_length=nq)
    labels = torch.tensor([1] * b + [0] * (2 * b))
    itm = F.cross_entropy(model.itm_head(h[:, :nq]).mean(1), labels)

    # ITG: the queries run again, under the combined mask; the LM head on every position
    dec = ids.clone()
    dec[:, 0] = model.dec_token_id
    embeds = model.embeddings(input_ids=dec, query_embeds=queries)
    h = run_qformer(qf, embeds, reference_itg_mask(nq, mask, dtype), image, query_length=nq)
    logits = model.lm_head(h[:, nq:], model.embeddings.word_embeddings.weight)
    itg_labels = dec.masked_fill(mask == 0, -100)
    itg = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), itg_labels[:, 1:].reshape(-1),
                          ignore_index=-100, label_smoothing=ls)
    return itc + itm + itg, itc, itm, itg


# ------------------------------------------------------------------------------------------ helpers
def build(dtype=torch.float32):
    torch.manual_seed(0)
    cfg = model_config("tiny", qformer={"num_layers": 3, "dropout": 0.0})
    tok = qformer_tokenizer(cfg)
    return cfg, tok, build_stage1(cfg, tok).to(dtype)


def batch(cfg, tok, rank, b, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + rank)
    s = cfg.vision.image_size
    enc = tok(CAPTIONS[rank * b:(rank + 1) * b], padding="max_length", max_length=12, truncation=True,
              return_tensors="pt")
    return torch.randn(b, 3, s, s, generator=g).to(dtype), enc.input_ids, enc.attention_mask


def fixed_negatives(neg_img, neg_txt):
    def sample(sim_i2t, sim_t2i, rank=0, generator=None):
        return neg_img, neg_txt
    return sample


def losses_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    out[0].backward()
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}
    return torch.stack([x.detach() for x in out]), grads


def assert_grads_equal(new, ref, rtol):
    """Per parameter: |new - ref| <= rtol * |ref| (norms), the same parameters without a gradient."""
    assert new.keys() == ref.keys()
    for name in ref:
        assert (new[name] is None) == (ref[name] is None), name
        if ref[name] is None:
            continue
        err = (new[name] - ref[name]).norm()
        size = ref[name].norm()
        # + an absolute floor: some gradients are zero in exact arithmetic (a key bias shifts every score of a
        # softmax row alike) and rounding noise of ~1e-12 in both
        assert err <= rtol * size + 1e-4 * rtol, (name, float(err), float(size))


def new_step(model, x, ids, mask, **kw):
    out = model(x, ids, mask, **kw)
    return out.loss, out.loss_itc, out.loss_itm, out.loss_itg


# ------------------------------------------------------------------------------------ world size 1
@pytest.mark.parametrize("dtype,train_mode", [(torch.float64, False), (torch.float64, True), (torch.float32, False)])
def test_step_equals_replaced_formulation_world_size_1(tiny_tokenizers, monkeypatch, dtype, train_mode):
    """Eval mode; and train mode with dropout 0 (the same code paths as training, minus the randomness)."""
    cfg, tok, model = build(dtype)
    model.train(train_mode)
    x, ids, mask = batch(cfg, tok, 0, 4, dtype)
    monkeypatch.setattr(losses, "sample_hard_negatives", fixed_negatives(torch.tensor([2, 0, 3, 1]),
                                                                         torch.tensor([1, 3, 0, 2])))
    new_losses, new_grads = losses_and_grads(model, lambda: new_step(model, x, ids, mask))
    ref_losses, ref_grads = losses_and_grads(model, lambda: reference_step(model, x, ids, mask))
    assert new_losses.dtype == dtype
    torch.testing.assert_close(new_losses, ref_losses, rtol=RTOL[dtype], atol=0)
    assert_grads_equal(new_grads, ref_grads, RTOL[dtype])
    # ITG's gradient reaches the queries through the query pass's cache, as in the reference
    assert new_grads["query_tokens"].abs().sum() > 0


def test_sampled_negatives_are_the_same_with_the_same_generator(tiny_tokenizers):
    cfg, tok, model = build()
    model.eval()
    x, ids, mask = batch(cfg, tok, 0, 4)
    drawn = []
    sample = losses.sample_hard_negatives

    def recording(*a, **kw):
        drawn.append(sample(*a, **kw))
        return drawn[-1]

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(losses, "sample_hard_negatives", recording)
        new = new_step(model, x, ids, mask, generator=torch.Generator().manual_seed(7))
        ref_drawn = sample(*_reference_sims(model, x, ids, mask), 0, torch.Generator().manual_seed(7))
    assert all(torch.equal(a, b) for a, b in zip(drawn[0], ref_drawn))
    assert torch.isfinite(new[0])


def _reference_sims(model, x, ids, mask):
    image = model.encode_image(x)
    nq = model.query_tokens.shape[1]
    feats = F.normalize(model.vision_projection(run_qformer(model.qformer, model.query_tokens.expand(len(ids), -1, -1),
                                                            None, image, query_length=nq)), dim=-1)
    text = run_qformer(model.qformer, model.embeddings(input_ids=ids), additive_mask(mask.bool())[:, None, None, :])
    text = F.normalize(model.text_projection(text[:, 0]), dim=-1)
    return (torch.einsum("bqe,ne->bnq", feats, text).amax(-1) / model.temp,
            torch.einsum("be,nqe->bnq", text, feats).amax(-1) / model.temp)


def test_step_under_bf16_autocast_keeps_logits_and_losses_float32(tiny_tokenizers):
    cfg, tok, model = build()
    model.eval()
    x, ids, mask = batch(cfg, tok, 0, 4)
    with torch.no_grad():
        fp32 = model(x, ids, mask, generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, ids, mask, generator=torch.Generator().manual_seed(0))
            image = model.encode_image(x)
            sims = losses.itc_similarities(model.image_feats(image), model.text_feat(ids, mask), model.temp)
            itm = model.itm_logits(image, ids, mask)
            dec = ids.clone()
            dec[:, 0] = model.dec_token_id
            lm = model.itg_logits(image, dec, mask)
    assert image.dtype == torch.float32  # ln_vision in float32
    assert all(s.dtype == torch.float32 for s in sims) and itm.dtype == torch.float32 and lm.dtype == torch.float32
    for k in ("loss", "loss_itc", "loss_itm", "loss_itg"):
        v, ref = getattr(out, k), getattr(fp32, k)
        assert v.dtype == torch.float32 and torch.isfinite(v), k
        assert float(v) == pytest.approx(float(ref), rel=0.05), k


# ------------------------------------------------------------------------------------ world size 2
B2 = 3
# local i of rank r -> a global index; crosses ranks for some rows and stays local for others
NEG_IMG = {0: torch.tensor([4, 2, 3]), 1: torch.tensor([0, 5, 1])}
NEG_TXT = {0: torch.tensor([1, 5, 3]), 1: torch.tensor([2, 0, 4])}


def _world_size_2_worker(rank, port, out_dir):
    import torch.distributed as dist

    from blip2_ray.train.distributed import all_gather_no_grad, all_gather_with_grad

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        losses.sample_hard_negatives = fixed_negatives(NEG_IMG[rank], NEG_TXT[rank])
        cfg, tok, model = build(torch.float64)
        model.eval()
        x, ids, mask = batch(cfg, tok, rank, B2, torch.float64)
        results = {}
        for name, fn in [
            ("new", lambda: new_step(model, x, ids, mask, rank=rank, gather=all_gather_no_grad)),
            ("ref", lambda: reference_step(model, x, ids, mask, rank=rank, gather=all_gather_no_grad,
                                           gather_with_grad=all_gather_with_grad)),
        ]:
            step_losses, grads = losses_and_grads(model, fn)
            summed = {n: None if g is None else g.clone() for n, g in grads.items()}
            for g in summed.values():  # what DeepSpeed's gradient all-reduce sums
                if g is not None:
                    dist.all_reduce(g)
            results[name] = {"losses": step_losses, "local": grads, "summed": summed}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_step_equals_replaced_formulation_world_size_2(tiny_tokenizers, tmp_path):
    mp.spawn(_world_size_2_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ln_vision = ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    rtol = RTOL[torch.float64]
    for r in ranks:
        torch.testing.assert_close(r["new"]["losses"], r["ref"]["losses"], rtol=rtol, atol=0)
        # the summed gradient (what every rank applies) is the same for every trainable parameter
        assert_grads_equal(r["new"]["summed"], r["ref"]["summed"], rtol)
        # per rank too, except ln_vision: a negative image's ln_vision gradient now lands on the rank that
        # used it, not on the image's owner
        local_new = {n: g for n, g in r["new"]["local"].items() if n not in ln_vision}
        assert_grads_equal(local_new, {n: g for n, g in r["ref"]["local"].items() if n not in ln_vision}, rtol)
        assert not torch.allclose(r["new"]["local"][ln_vision[0]], r["ref"]["local"][ln_vision[0]])
