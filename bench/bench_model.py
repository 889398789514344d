"""Model benchmark (`make bench-model`).

1. Stage-2 training step (forward + backward + AdamW on the trainable parameters) of our Blip2Stage2
   vs transformers' Blip2ForConditionalGeneration holding the same weights, same batch, same process,
   interleaved; reports the ratio ours / transformers (target <= 1.0).
2. Our stage-1 step time split by component: frozen ViT, ITC, ITM, ITG (forward + backward each).

Usage: python bench/bench_model.py [--device cpu|cuda] [--size small|real] [--steps N] [--batch B]
`--size real` is ViT-g + OPT-2.7B in bf16 (a GPU with ~40 GB); `small` is a CPU-sized config.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from blip2_ray.model import builders, hf_format, tokenizer_paths  # noqa: E402
from blip2_ray.model.config import model_config  # noqa: E402

SMALL = dict(
    vision=dict(hidden_size=256, intermediate_size=1024, num_layers=6, num_heads=4, image_size=112, patch_size=14,
                dtype="float32"),
    qformer=dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, num_query_tokens=32,
                 embed_dim=128),
    llm=dict(hidden_size=256, num_layers=6, num_heads=4, ffn_size=1024, vocab_size=0, dtype="float32"),
)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, steps, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def bench_stage2(args):
    if args.size == "real":
        cfg = model_config("vitg_opt2.7b", vision={"dtype": "bfloat16"}, llm={"dtype": "bfloat16"},
                           allow_random_init=True)
    else:
        cfg = model_config("tiny", **SMALL)
    tok = tokenizer_paths.llm_tokenizer(cfg)
    torch.manual_seed(0)
    ours = builders.build_stage2(cfg, tok)
    from transformers import Blip2ForConditionalGeneration

    with tempfile.TemporaryDirectory() as d:
        hf_format.export_stage2(ours, d, tok, cfg)
        dtype = torch.bfloat16 if args.size == "real" else torch.float32
        theirs = Blip2ForConditionalGeneration.from_pretrained(d, dtype=dtype)
    # the same frozen / trainable split on both
    for n, p in theirs.named_parameters():
        frozen = n.startswith("language_model.") or (n.startswith("vision_model.") and "post_layernorm" not in n)
        p.requires_grad_(not frozen)
    ours.to(args.device).train()
    theirs.to(args.device).train()
    theirs.language_model.eval()

    b, s = args.batch, cfg.vision.image_size
    x = torch.randn(b, 3, s, s, device=args.device)
    caps = [f"a photo of a {c} {sh} on a white background\n"
            for c, sh in zip(["red", "blue", "green", "black"] * 64, ["circle", "square", "star", "ring"] * 64)][:b]
    enc = tok(caps, padding="max_length", max_length=cfg.llm.max_text_len, truncation=True,
              return_tensors="pt").to(args.device)
    nq = cfg.qformer.num_query_tokens
    img = theirs.config.image_token_index
    hf_ids = torch.cat([torch.full((b, nq), img, device=args.device), enc.input_ids], 1)
    hf_mask = torch.cat([torch.ones(b, nq, dtype=torch.long, device=args.device), enc.attention_mask], 1)
    labels = hf_ids.masked_fill(hf_mask == 0, -100)
    labels[:, : nq + 1] = -100

    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-5)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if args.device == "cuda"
                else torch.autocast("cpu", enabled=False))

    def step_ours():
        with autocast:
            loss = ours(x.to(next(ours.vision_model.parameters()).dtype), enc.input_ids, enc.attention_mask).loss
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_theirs():
        with autocast:
            loss = theirs(pixel_values=x.to(dtype), input_ids=hf_ids, attention_mask=hf_mask, labels=labels).loss
        loss.backward()
        opt_theirs.step()
        opt_theirs.zero_grad(set_to_none=True)

    t_ours, t_theirs = [], []
    timed(step_ours, args.device, 0)
    timed(step_theirs, args.device, 0)
    for _ in range(args.steps):  # interleaved, so drift on a shared machine hits both alike
        t_ours += timed(step_ours, args.device, 1, warmup=0)
        t_theirs += timed(step_theirs, args.device, 1, warmup=0)
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    print(f"stage-2 train step, {args.size} config, batch {b}, device {args.device}:")
    print(f"  ours          {mo * 1000:9.1f} ms/step  {b / mo:8.1f} samples/s")
    print(f"  transformers  {mt * 1000:9.1f} ms/step  {b / mt:8.1f} samples/s")
    print(f"  ratio ours/transformers step time = {mo / mt:.3f} (target <= 1.0)")
    return mo / mt


def bench_stage1(args):
    cfg = (model_config("vitg_opt2.7b", vision={"dtype": "bfloat16"}, allow_random_init=True) if args.size == "real"
           else model_config("tiny", **SMALL))
    tok = tokenizer_paths.qformer_tokenizer(cfg)
    torch.manual_seed(0)
    m = builders.build_stage1(cfg, tok).to(args.device).train()
    b, s = args.batch, cfg.vision.image_size
    x = torch.randn(b, 3, s, s, device=args.device).to(next(m.vision_model.parameters()).dtype)
    enc = tok([f"a photo of a red circle number {i}" for i in range(b)], padding="max_length", max_length=32,
              truncation=True, return_tensors="pt").to(args.device)
    ids, mask = enc.input_ids, enc.attention_mask
    from blip2_ray.model import losses

    image = m.encode_image(x).detach()

    def vit():
        m.encode_image(x)

    def itc():
        s1, s2 = losses.itc_similarities(m.image_feats(image), m.text_feat(ids, mask), m.temp)
        losses.itc_loss(s1, s2).backward()

    with torch.no_grad():
        s_i2t, s_t2i = losses.itc_similarities(m.image_feats(image), m.text_feat(ids, mask), m.temp)

    def itm():
        ni, nt = losses.sample_hard_negatives(s_i2t, s_t2i)
        logits = m.itm_logits(torch.cat([image, image[ni], image]), torch.cat([ids, ids, ids[nt]]),
                              torch.cat([mask, mask, mask[nt]]))
        losses.itm_loss(logits, b).backward()

    def itg():
        dec = ids.clone()
        dec[:, 0] = m.dec_token_id
        losses.itg_loss(m.itg_logits(image, dec, mask), dec.masked_fill(mask == 0, -100)).backward()

    def full():
        m(x, ids, mask).loss.backward()

    parts = {name: statistics.median(timed(fn, args.device, args.steps)) for name, fn in
             [("ViT (frozen, forward)", vit), ("ITC", itc), ("ITM", itm), ("ITG", itg), ("full step", full)]}
    total = sum(v for k, v in parts.items() if k != "full step")
    print(f"stage-1 step by component, {args.size} config, batch {b} (forward + backward each):")
    for k, v in parts.items():
        share = f"{100 * v / total:5.1f}%" if k != "full step" else "      "
        print(f"  {k:24s} {v * 1000:9.1f} ms  {share}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["small", "real"], default="small")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    bench_stage2(args)
    bench_stage1(args)


if __name__ == "__main__":
    main()
