"""A tiny LAVIS stage-1 checkpoint (and eva_vit_g.pth), written in LAVIS's key layout, loaded through the
project with `ln_vision_eps: 1e-5`, reproduces ITC, ITG and the similarity matrix of a reference computed
here directly from the raw LAVIS tensors, as LAVIS's modules compute them (blip2_qformer.py, Qformer.py,
eva_vit.py: ITG attends to the query pass's cached keys/values). Also: a LAVIS stage-2 checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_weight_layouts import eva_state, ln_pair, rand

from blip2_ray.model import losses
from blip2_ray.model.config import model_config
from blip2_ray.weights.builders import build_stage1, build_stage2
from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer

H, HEADS, FFN, Q, E, L, FREQ, DV, P = 32, 4, 64, 8, 16, 2, 2, 32, 64  # tiny preset sizes


def lavis_stage1_state(vocab: int, stage: int = 1) -> dict:
    """blip2_qformer's state dict (as LAVIS's runner saves it: no frozen visual_encoder)."""
    sd = {"query_tokens": rand(1, Q, H, scale=0.5), "Qformer.bert.embeddings.position_ids": torch.arange(P)[None]}
    sd.update(ln_pair("Qformer.bert.embeddings.LayerNorm", H))
    sd.update(ln_pair("ln_vision", DV))
    if stage == 1:
        sd.update({"Qformer.bert.embeddings.word_embeddings.weight": rand(vocab, H, scale=0.5),
                   "Qformer.bert.embeddings.position_embeddings.weight": rand(P, H, scale=0.5)})
    for i in range(L):
        p = f"Qformer.bert.encoder.layer.{i}."
        blocks = ["attention"] + (["crossattention"] if i % FREQ == 0 else [])
        for a in blocks:
            kv = DV if a == "crossattention" else H
            sd.update({f"{p}{a}.self.query.weight": rand(H, H, scale=0.3), f"{p}{a}.self.query.bias": rand(H),
                       f"{p}{a}.self.key.weight": rand(H, kv, scale=0.3), f"{p}{a}.self.key.bias": rand(H),
                       f"{p}{a}.self.value.weight": rand(H, kv, scale=0.3), f"{p}{a}.self.value.bias": rand(H),
                       f"{p}{a}.output.dense.weight": rand(H, H, scale=0.3), f"{p}{a}.output.dense.bias": rand(H)})
            sd.update(ln_pair(f"{p}{a}.output.LayerNorm", H))
        for suffix in ("_query",) + (("",) if stage == 1 else ()):
            sd.update({f"{p}intermediate{suffix}.dense.weight": rand(FFN, H, scale=0.3),
                       f"{p}intermediate{suffix}.dense.bias": rand(FFN),
                       f"{p}output{suffix}.dense.weight": rand(H, FFN, scale=0.3),
                       f"{p}output{suffix}.dense.bias": rand(H)})
            sd.update(ln_pair(f"{p}output{suffix}.LayerNorm", H))
    if stage == 1:
        sd.update({"Qformer.cls.predictions.transform.dense.weight": rand(H, H, scale=0.3),
                   "Qformer.cls.predictions.transform.dense.bias": rand(H),
                   "Qformer.cls.predictions.bias": rand(vocab)})
        sd.update(ln_pair("Qformer.cls.predictions.transform.LayerNorm", H))
        sd["Qformer.cls.predictions.decoder.weight"] = sd["Qformer.bert.embeddings.word_embeddings.weight"]
        sd["Qformer.cls.predictions.decoder.bias"] = sd["Qformer.cls.predictions.bias"]
        sd.update({"vision_proj.weight": rand(E, H, scale=0.3), "vision_proj.bias": rand(E),
                   "text_proj.weight": rand(E, H, scale=0.3), "text_proj.bias": rand(E),
                   "itm_head.weight": rand(2, H), "itm_head.bias": rand(2), "temp": torch.tensor(0.07)})
    return sd


# ----------------------------------------------------------------------- the reference, from raw tensors
def eva_forward(sd: dict, x: torch.Tensor, depth: int) -> torch.Tensor:
    """LAVIS VisionTransformer.forward_features: patch conv, cls, pos, pre-norm blocks, no final norm."""
    h = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
    h = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), h], 1) + sd["pos_embed"]
    b, n, d = h.shape
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(h, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        bias = torch.cat([sd[p + "attn.q_bias"], torch.zeros(d), sd[p + "attn.v_bias"]])
        q, k, v = F.linear(y, sd[p + "attn.qkv.weight"], bias).reshape(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * (d // HEADS) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        ctx = (attn @ v).transpose(1, 2).reshape(b, n, d)
        h = h + F.linear(ctx, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        y = F.layer_norm(h, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        h = h + F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return h


def lin(sd, p, x):
    return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])


def ln(sd, p, x, eps=1e-12):
    return F.layer_norm(x, (x.shape[-1],), sd[p + ".weight"], sd[p + ".bias"], eps)


def heads(x):
    return x.view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)


def attend(sd, p, x, kv, mask=None, past=None):
    """BertSelfAttention (+ cached keys/values `past` in front); returns (context, (k, v))."""
    k, v = heads(lin(sd, p + ".key", kv)), heads(lin(sd, p + ".value", kv))
    if past is not None:
        k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
    scores = heads(lin(sd, p + ".query", x)) @ k.transpose(-1, -2) / math.sqrt(H // HEADS)
    if mask is not None:
        scores = scores + mask
    ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], H)
    return ctx, (k, v)


def qformer_forward(sd, h, mask=None, image=None, query_length=0, pasts=None):
    """LAVIS BertEncoder: per layer self-attention, cross-attention and query FFN for the first
    `query_length` positions, text FFN for the rest. Returns (hidden, per-layer self-attention k/v)."""
    cache = []
    for i in range(L):
        p = f"Qformer.bert.encoder.layer.{i}."
        ctx, kv = attend(sd, p + "attention.self", h, h, mask, pasts[i] if pasts else None)
        cache.append(kv)
        h1 = ln(sd, p + "attention.output.LayerNorm", lin(sd, p + "attention.output.dense", ctx) + h)
        qh, th = h1[:, :query_length], h1[:, query_length:]
        if query_length and i % FREQ == 0:
            c, _ = attend(sd, p + "crossattention.self", qh, image)
            qh = ln(sd, p + "crossattention.output.LayerNorm", lin(sd, p + "crossattention.output.dense", c) + qh)
        parts = []
        if query_length:
            y = lin(sd, p + "output_query.dense", F.gelu(lin(sd, p + "intermediate_query.dense", qh)))
            parts.append(ln(sd, p + "output_query.LayerNorm", y + qh))
        if th.shape[1]:
            y = lin(sd, p + "output.dense", F.gelu(lin(sd, p + "intermediate.dense", th)))
            parts.append(ln(sd, p + "output.LayerNorm", y + th))
        h = torch.cat(parts, 1)
    return h, cache


def reference(sd: dict, eva: dict, pixels, ids, mask, dec_id: int, eps: float):
    """blip2_qformer.Blip2Qformer.forward's ITC and ITG (no ITM), from the raw tensors."""
    image = F.layer_norm(eva_forward(eva, pixels, L), (DV,), sd["ln_vision.weight"], sd["ln_vision.bias"], eps)
    b = pixels.shape[0]
    queries = ln(sd, "Qformer.bert.embeddings.LayerNorm", sd["query_tokens"].expand(b, -1, -1))
    q_out, q_cache = qformer_forward(sd, queries, image=image, query_length=Q)
    image_feats = F.normalize(lin(sd, "vision_proj", q_out), dim=-1)
    pos = sd["Qformer.bert.embeddings.position_embeddings.weight"][: ids.shape[1]]
    word = sd["Qformer.bert.embeddings.word_embeddings.weight"]
    pad_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
    t_out, _ = qformer_forward(sd, ln(sd, "Qformer.bert.embeddings.LayerNorm", word[ids] + pos), pad_mask)
    text_feat = F.normalize(lin(sd, "text_proj", t_out[:, 0]), dim=-1)
    sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, text_feat).amax(-1) / sd["temp"]
    sim_t2i = sim_i2t.t()  # one rank: the same matrix seen from the texts
    targets = torch.arange(b)
    itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
           + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
    # ITG: [DEC] first, text attends to the cached query keys/values and causally to itself
    dec = ids.clone()
    dec[:, 0] = dec_id
    t = ids.shape[1]
    causal = torch.tril(torch.ones(t, t))
    allowed = torch.cat([torch.ones(b, t, Q), causal[None] * mask[:, None, :].float()], 2)  # (B, T, Q+T)
    itg_mask = (1.0 - allowed[:, None]) * -10000.0
    dec_embeds = ln(sd, "Qformer.bert.embeddings.LayerNorm", word[dec] + pos)
    d_out, _ = qformer_forward(sd, dec_embeds, itg_mask, pasts=q_cache)
    head = "Qformer.cls.predictions.transform"
    hdn = ln(sd, head + ".LayerNorm", F.gelu(lin(sd, head + ".dense", d_out)))
    logits = F.linear(hdn, word, sd["Qformer.cls.predictions.bias"])
    labels = dec.masked_fill(mask == 0, -100)
    itg = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                          label_smoothing=0.1)
    return itc, itg, sim_i2t


@pytest.fixture(scope="module")
def lavis_files(tmp_path_factory, tiny_tokenizers):
    root = tmp_path_factory.mktemp("lavis")
    tok = qformer_tokenizer(model_config("tiny"))
    sd, eva = lavis_stage1_state(len(tok)), eva_state(depth=L + 1)
    # a small residual stream (variance ~1e-6, as a trained EVA's output can be per token) makes
    # ln_vision's epsilon matter, as it does for the real checkpoints
    eva = {k: v if "norm" in k else v * 0.003 for k, v in eva.items()}
    torch.save({"model": sd}, root / "blip2_pretrained.pth")
    torch.save(eva, root / "eva_vit_g.pth")
    return root, tok, sd, eva


def test_lavis_stage1_checkpoint_reproduces_the_reference_itc_itg_and_similarities(lavis_files):
    root, tok, sd, eva = lavis_files
    cfg = model_config("tiny", vision={"path": str(root / "eva_vit_g.pth"), "ln_vision_eps": 1e-5},
                       init_from=str(root / "blip2_pretrained.pth"))
    model = build_stage1(cfg, tok).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    enc = tok(["a red circle", "a blue square on a white background", "a green star", "two cats"],
              padding="longest", return_tensors="pt")
    with torch.no_grad():
        ref_itc, ref_itg, ref_sim = reference(sd, eva, x, enc.input_ids, enc.attention_mask, tok.bos_token_id, 1e-5)
        out = model(x, enc.input_ids, enc.attention_mask, generator=torch.Generator().manual_seed(0))
        image = model.encode_image(x)
        sim, _ = losses.itc_similarities(model.image_feats(image), model.text_feat(enc.input_ids, enc.attention_mask),
                                         model.temp)
    assert (sim - ref_sim).abs().max().item() <= 1e-4
    assert abs(out.loss_itc.item() - ref_itc.item()) <= 1e-4
    assert abs(out.loss_itg.item() - ref_itg.item()) <= 1e-4
    assert torch.equal(model.temp.detach(), sd["temp"]) and torch.equal(model.query_tokens.detach(), sd["query_tokens"])
    # HF's convention (ln_vision eps = the ViT's 1e-6) does not reproduce LAVIS on the same weights
    hf_convention = build_stage1(model_config("tiny", vision={"path": str(root / "eva_vit_g.pth")},
                                              init_from=str(root / "blip2_pretrained.pth")), tok).eval()
    with torch.no_grad():
        other = hf_convention(x, enc.input_ids, enc.attention_mask, generator=torch.Generator().manual_seed(0))
    assert abs(other.loss_itc.item() - ref_itc.item()) > 1e-3


def test_lavis_stage2_checkpoint_loads_into_stage2(tmp_path, tiny_tokenizers):
    """blip2_opt's checkpoint: query path of the Q-Former only, opt_proj, ln_vision (no text side, no ViT)."""
    cfg0 = model_config("tiny")
    sd = lavis_stage1_state(0, stage=2)
    d_llm = 32
    sd.update({"opt_proj.weight": rand(d_llm, H), "opt_proj.bias": rand(d_llm)})
    torch.save({"model": sd, "epoch": 4}, tmp_path / "blip2_opt.pth")
    torch.save(eva_state(depth=L), tmp_path / "eva_vit_g.pth")
    cfg = model_config("tiny", vision={"path": str(tmp_path / "eva_vit_g.pth")},
                       init_from=str(tmp_path / "blip2_opt.pth"))
    s = build_stage2(cfg, llm_tokenizer(cfg0)).state_dict()
    assert torch.equal(s["language_projection.weight"], sd["opt_proj.weight"])
    assert torch.equal(s["query_tokens"], sd["query_tokens"])
    assert torch.equal(s["vision_model.post_layernorm.bias"], sd["ln_vision.bias"])
    k = "Qformer.bert.encoder.layer.0.crossattention.self.key.weight"
    assert torch.equal(s["qformer.encoder.layer.0.crossattention.attention.key.weight"], sd[k])
    assert torch.equal(s["qformer.encoder.layer.1.output_query.LayerNorm.weight"],
                       sd["Qformer.bert.encoder.layer.1.output_query.LayerNorm.weight"])


def test_a_lavis_stage2_checkpoint_cannot_start_stage1(tmp_path, tiny_tokenizers):
    from blip2_ray.errors import UserError

    torch.save({"model": lavis_stage1_state(0, stage=2)}, tmp_path / "blip2_opt.pth")
    torch.save(eva_state(depth=L), tmp_path / "eva_vit_g.pth")
    cfg = model_config("tiny", vision={"path": str(tmp_path / "eva_vit_g.pth")},
                       init_from=str(tmp_path / "blip2_opt.pth"))
    with pytest.raises(UserError, match=r"blip2_opt\.pth' lacks weights the model needs: .*(embeddings|intermediate)"):
        build_stage1(cfg, qformer_tokenizer(cfg))
