"""Model benchmark (`make bench-model`).

1. Stage-2 training step (forward + backward + AdamW on the trainable parameters) of our Blip2Stage2
   vs transformers' Blip2ForConditionalGeneration holding the same weights, same batch, same process,
   interleaved; reports the ratio ours / transformers (target <= 1.0).
2. Our stage-1 step time split by component: frozen ViT, image side of ITC (image keys/values, query
   pass) with the text pass and ITC loss, ITM, ITG (forward + backward each).
3. The stage-1 step at the real Q-Former size (BERT-base, 32 queries, vocab 30,523, cross-attention every
   2nd layer; ViT-g width 1408 with `--vit-blocks` frozen blocks at 224 px; fp32, dropout on, AdamW):
   the formulation it replaced (kept below as `replaced_stage1_loss`: ITG re-runs the queries through
   every layer, ITM projects every image of its 3B pairs to keys/values again, LM head on every
   position) against the model's step, in ABBA rounds in one process on one model and optimizer;
   per-round ratios of samples/s and their median (target >= 1.25x).

Usage: python bench/bench_model.py [--device cpu|cuda] [--size small|real] [--steps N] [--batch B]
       [--sections stage2,stage1,stage1-step] [--rounds R] [--vit-blocks N] [--threads N]
`--size real` is ViT-g + OPT-2.7B in bf16 (a GPU with ~40 GB); `small` is a CPU-sized config.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from blip2_ray.model.config import model_config
from blip2_ray.weights import builders, hf_format, tokenizer_paths

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
    ids, mask = caption_batch(tok, b, args.device)
    from blip2_ray.model import losses
    from blip2_ray.model.qformer_passes import select_images

    image = m.encode_image(x).detach()
    with torch.no_grad():
        s_i2t, s_t2i = losses.itc_similarities(m.image_feats(image), m.text_feat(ids, mask), m.temp)
        image_kv = [None if kv is None else (kv[0].detach(), kv[1].detach()) for kv in m.image_keys_values(image)]
        _, cache = m.query_pass(image_kv, keep_kv=True)
    dec = ids.clone()
    dec[:, 0] = m.dec_token_id
    positions, targets = losses.itg_targets(dec.masked_fill(mask == 0, -100))

    def vit():
        m.encode_image(x)

    def itc():
        h, _ = m.query_pass(m.image_keys_values(image))
        s1, s2 = losses.itc_similarities(m._image_feats_from_queries(h), m.text_feat(ids, mask), m.temp)
        losses.itc_loss(s1, s2).backward()

    def itm():
        ni, nt = losses.sample_hard_negatives(s_i2t, s_t2i)
        local = torch.arange(b, device=args.device)
        logits = m.itm_logits_from_kv(select_images(image_kv, torch.cat([local, ni, local])),
                                      torch.cat([ids, ids, ids[nt]]), torch.cat([mask, mask, mask[nt]]))
        losses.itm_loss(logits, b).backward()

    def itg():
        h = m.itg_hidden(cache, dec, mask).flatten(0, 1)[positions]
        losses.itg_loss(m.lm_head(h, m.embeddings.word_embeddings.weight), targets).backward()

    def full():
        m(x, ids, mask).loss.backward()

    parts = {name: statistics.median(timed(fn, args.device, args.steps)) for name, fn in
             [("ViT (frozen, forward)", vit), ("ITC (image K/V, queries)", itc), ("ITM", itm), ("ITG (cached)", itg),
              ("full step", full)]}
    total = sum(v for k, v in parts.items() if k != "full step")
    print(f"stage-1 step by component, {args.size} config, batch {b} (forward + backward each):")
    for k, v in parts.items():
        share = f"{100 * v / total:5.1f}%" if k != "full step" else "      "
        print(f"  {k:24s} {v * 1000:9.1f} ms  {share}")


CAPTIONS = [  # COCO-like lengths (8-16 words); padded to 32 tokens as the data pipeline does
    "a man riding a wave on top of a surfboard",
    "two plates of food with broccoli and rice on a wooden table next to a glass of water",
    "a giraffe standing next to a tree in a field",
    "a red double decker bus driving down a city street past tall buildings",
    "a cat sleeping on a laptop keyboard",
    "a group of people standing around a kitchen preparing a meal together",
    "a train traveling over a bridge across a river",
    "an old clock tower with a blue sky and white clouds behind it",
]


def caption_batch(tok, b, device, max_len=32):
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(b)]
    enc = tok(caps, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt").to(device)
    return enc.input_ids, enc.attention_mask


def replaced_stage1_loss(m, pixel_values, ids, mask):
    """The stage-1 loss as the model computed it before the ITG cache (world size 1): the baseline.

    Every pass through transformers' `Blip2QFormerLayer.forward` (the image keys/values projected
    again in each pass), ITG re-running the queries with cross-attention under a combined
    (B, 1, Q+T, Q+T) mask, ITM's 3B images each projected to keys/values, the LM head on every
    position.
    """
    import torch.nn.functional as F

    from blip2_ray.model import losses
    from blip2_ray.model.qformer import run_qformer

    def additive(allowed):
        return (~allowed).to(torch.float32) * torch.finfo(torch.float32).min

    ls = m.cfg.qformer.label_smoothing
    qf, nq, b = m.qformer, m.query_tokens.shape[1], ids.shape[0]
    image = m.encode_image(pixel_values)
    queries = m.query_tokens.expand(b, -1, -1)
    feats = F.normalize(m.vision_projection(run_qformer(qf, queries, None, image, query_length=nq)), dim=-1)
    text = run_qformer(qf, m.embeddings(input_ids=ids), additive(mask.bool())[:, None, None, :])
    text = F.normalize(m.text_projection(text[:, 0]), dim=-1)
    sim_i2t, sim_t2i = losses.itc_similarities(feats, text, m.temp)
    loss_itc = losses.itc_loss(sim_i2t, sim_t2i, 0, ls)

    neg_img, neg_txt = losses.sample_hard_negatives(sim_i2t, sim_t2i)
    itm_ids, itm_mask = torch.cat([ids, ids, ids[neg_txt]]), torch.cat([mask, mask, mask[neg_txt]])
    embeds = m.embeddings(input_ids=itm_ids, query_embeds=m.query_tokens.expand(3 * b, -1, -1))
    keep = torch.cat([torch.ones(3 * b, nq, dtype=torch.bool, device=ids.device), itm_mask.bool()], 1)
    h = run_qformer(qf, embeds, additive(keep)[:, None, None, :], torch.cat([image, image[neg_img], image]),
                    query_length=nq)
    loss_itm = losses.itm_loss(m.itm_head(h[:, :nq]).mean(dim=1), b)

    dec = ids.clone()
    dec[:, 0] = m.dec_token_id
    embeds = m.embeddings(input_ids=dec, query_embeds=queries)
    t = ids.shape[1]
    idx = torch.arange(nq + t, device=ids.device)
    is_query_key, is_query_row = idx[None, :] < nq, idx[:, None] < nq
    allowed = torch.where(is_query_row, is_query_key, is_query_key | (idx[None, :] <= idx[:, None]))
    key_ok = torch.cat([torch.ones(b, nq, dtype=torch.bool, device=ids.device), mask.bool()], 1)
    h = run_qformer(qf, embeds, additive(allowed[None] & key_ok[:, None, :])[:, None], image, query_length=nq)
    logits = m.lm_head(h[:, nq:], m.embeddings.word_embeddings.weight)[:, :-1]
    labels = dec.masked_fill(mask == 0, -100)[:, 1:]
    loss_itg = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                               label_smoothing=ls)
    return loss_itc + loss_itm + loss_itg


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_stage1_step(args):
    cfg = model_config("vitg_opt2.7b", vision={"num_layers": args.vit_blocks, "dtype": "float32"},
                       allow_random_init=True)
    tok = tokenizer_paths.qformer_tokenizer(cfg)
    torch.manual_seed(0)
    m = builders.build_stage1(cfg, tok).to(args.device).train()  # dropout 0.1 on
    b, s = args.batch, cfg.vision.image_size
    x = torch.randn(b, 3, s, s, device=args.device)
    ids, mask = caption_batch(tok, b, args.device)
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=1e-5)  # one model and optimizer for both

    def step(loss_fn):
        def run():
            loss_fn().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    arms = {"replaced": step(lambda: replaced_stage1_loss(m, x, ids, mask)),
            "current": step(lambda: m(x, ids, mask).loss)}
    for fn in arms.values():  # warm-up
        fn()

    def one_step(fn):  # wall and process CPU seconds (CPU time is less hit by other processes on the machine)
        sync(args.device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        sync(args.device)
        return time.perf_counter() - wall, time.process_time() - cpu

    print(f"stage-1 step at real Q-Former size (BERT-base, 32 queries, vocab {m.lm_head.bias.numel()}; ViT-g width "
          f"{cfg.vision.hidden_size}, {cfg.vision.num_layers} frozen blocks, {s} px), batch {b}, fp32, dropout "
          f"{cfg.qformer.dropout}, AdamW, device {args.device}, {torch.get_num_threads()} threads, "
          f"{args.rounds} ABBA rounds:")
    times = {k: [] for k in arms}
    ratios, cpu_ratios = [], []
    for r in range(args.rounds):  # ABBA: linear drift within a round hits both arms alike
        a, b_ = ("replaced", "current") if r % 2 == 0 else ("current", "replaced")
        order = [a, b_, b_, a]
        got = {k: [] for k in arms}
        for k in order:
            got[k].append(one_step(arms[k]))
        for k in arms:
            times[k] += got[k]
        ratios.append(sum(w for w, _ in got["replaced"]) / sum(w for w, _ in got["current"]))
        cpu_ratios.append(sum(c for _, c in got["replaced"]) / sum(c for _, c in got["current"]))
        print(f"  round {r + 1} ({', '.join(order)}): speed-up {ratios[-1]:.2f}x, in CPU time {cpu_ratios[-1]:.2f}x",
              flush=True)
    mean = {k: statistics.mean(w for w, _ in v) for k, v in times.items()}
    for k in arms:
        print(f"  {k:9s} {mean[k]:8.2f} s/step  {b / mean[k]:6.3f} samples/s  (wall s/step: "
              + ", ".join(f"{w:.1f}" for w, _ in times[k]) + "; CPU s/step: "
              + ", ".join(f"{c:.1f}" for _, c in times[k]) + ")")
    print("  speed-up current/replaced (samples/s) per round: " + ", ".join(f"{r:.2f}" for r in ratios)
          + f"; median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}; target >= 1.25x)")
    print("  the same in process CPU time per round: " + ", ".join(f"{r:.2f}" for r in cpu_ratios)
          + f"; median {statistics.median(cpu_ratios):.2f}x")
    print(f"  peak RSS of this process so far: {peak_rss_gib():.2f} GiB")
    return statistics.median(ratios)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["small", "real"], default="small")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sections", default="stage2,stage1,stage1-step", help="comma-separated sections to run")
    ap.add_argument("--rounds", type=int, default=4, help="ABBA rounds of the real-size stage-1 step")
    ap.add_argument("--vit-blocks", type=int, default=4, help="frozen ViT-g blocks in the real-size stage-1 step")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: torch's default); 1 keeps a shared machine's load out of CPU time")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads()))
    sections = {"stage2": bench_stage2, "stage1": bench_stage1, "stage1-step": bench_stage1_step}
    unknown = set(args.sections.split(",")) - set(sections)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; valid: {', '.join(sections)}")
    for name, fn in sections.items():
        if name in args.sections.split(","):
            fn(args)


if __name__ == "__main__":
    main()
