"""GPU figures of the model code against baselines run in the same process (bench/gpu_check.sh runs it).

    python bench/gpu_check.py [--tiny] [--device cuda|cpu] [--out results.json]

1. stage 1 at ViT-g size (EVA ViT-g/14 width, 39 blocks, 224 px, bf16 storage; BERT-base Q-Former, 32
   queries; bf16 autocast; AdamW on the trainable parts): samples/s of the training step against the
   frozen ViT-g forward alone (images/s) on the same images. Target: step >= 60% of the forward's rate.
2. stage 2 (vitg_opt2.7b, ViT and OPT in bf16): our training step against transformers'
   Blip2ForConditionalGeneration holding the same weights (loss with labels, the same AdamW on the same
   trainable parts). Target: ours >= 1.3x HF's samples/s.
3. caption latency, batch 1, greedy, exactly 30 new tokens: Blip2Stage2.generate against HF's generate
   on the same weights. Target: ours <= 0.4x HF's seconds.
`--tiny`: the tiny presets (CPU-sized, for rehearsing the exact command). Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def timed(fn, iters: int, device) -> float:
    """Seconds per call of fn(), after one warm-up call (device synchronised around the timing)."""
    import torch

    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def optimizer(model):
    import torch

    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def stage1_check(args, device) -> dict:
    import torch

    from blip2_ray.model.config import model_config
    from blip2_ray.model.vision import vision_trunk
    from blip2_ray.weights.builders import build_stage1

    preset = "tiny" if args.tiny else "vitg_opt2.7b"
    cfg = model_config(preset, vision={"dtype": "bfloat16"}, allow_random_init=True)
    torch.manual_seed(0)
    model = build_stage1(cfg).to(device).train()
    opt = optimizer(model)
    b = args.stage1_batch
    pixels = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    ids = torch.randint(5, 1000 if not args.tiny else 30, (b, 32), device=device)
    mask = torch.ones_like(ids)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(pixels, ids, mask)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def vit():
        with torch.no_grad():
            vision_trunk(model.vision_model, pixels)

    step_s, vit_s = timed(step, args.iters, device), timed(vit, args.iters, device)
    out = {"batch": b, "samples_per_s": b / step_s, "vit_forward_images_per_s": b / vit_s,
           "step_over_vit_forward": vit_s / step_s, "target": ">= 0.6"}
    return out  # the stage-1 model is freed here, before the stage-2 models are built


def stage2_models(args, device):
    import torch
    from transformers import Blip2ForConditionalGeneration

    from blip2_ray.model.config import model_config
    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.hf_configs import _hf_from_state, stage2_hf_config
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    preset = "tiny" if args.tiny else "vitg_opt2.7b"
    cfg = model_config(preset, vision={"dtype": "bfloat16"}, llm={"dtype": "bfloat16"}, allow_random_init=True)
    tok = llm_tokenizer(cfg)
    torch.manual_seed(0)
    ours = build_stage2(cfg, tok)
    image_token = ours.llm_embeddings().num_embeddings - 1  # a spare row, as the processor's <image>
    hf_state = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    hf = _hf_from_state(Blip2ForConditionalGeneration, stage2_hf_config(ours, image_token), hf_state)
    hf.vision_model.requires_grad_(False)
    hf.language_model.requires_grad_(False)
    hf.vision_model.post_layernorm.requires_grad_(True)
    return cfg, ours.to(device), hf.to(device), image_token


def stage2_check(args, device, cfg, ours, hf, image_token) -> dict:
    import torch

    b, t = args.stage2_batch, 24
    pixels = torch.randn(b, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    ids = torch.randint(5, 1000 if not args.tiny else 30, (b, t), device=device)
    ids[:, 0] = 2  # BOS
    mask = torch.ones_like(ids)
    nq = ours.num_query_tokens
    hf_ids = torch.cat([torch.full((b, nq), image_token, device=device), ids], 1)
    labels = torch.cat([torch.full((b, nq + 1), -100, device=device), ids[:, 1:]], 1)

    def make_step(model, forward):
        opt = optimizer(model)
        model.train()

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = forward()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    ours_s = timed(make_step(ours, lambda: ours(pixels, ids, mask).loss), args.iters, device)
    hf_s = timed(make_step(hf, lambda: hf(pixel_values=pixels, input_ids=hf_ids, labels=labels).loss),
                 args.iters, device)
    return {"batch": b, "ours_samples_per_s": b / ours_s, "hf_samples_per_s": b / hf_s,
            "ours_over_hf": hf_s / ours_s, "target": ">= 1.3"}


def caption_check(args, device, cfg, ours, hf, image_token) -> dict:
    import torch

    ours.eval()
    hf.eval()
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    n = 30
    kw = dict(num_beams=1, do_sample=False, max_new_tokens=n, min_new_tokens=n)
    bos = torch.tensor([[2]], device=device)
    hf_ids = torch.cat([torch.full((1, ours.num_query_tokens), image_token, device=device), bos], 1)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        ours_s = timed(lambda: ours.generate(pixels, **kw), args.caption_iters, device)
        hf_s = timed(lambda: hf.generate(pixel_values=pixels, input_ids=hf_ids, **kw), args.caption_iters, device)
    return {"new_tokens": n, "ours_s": ours_s, "hf_s": hf_s, "ours_over_hf": ours_s / hf_s, "target": "<= 0.4"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny presets (a CPU rehearsal of the command)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    import torch

    device = torch.device(args.device)
    args.iters = args.iters or (3 if args.tiny else 10)
    args.caption_iters = 2 if args.tiny else 5
    args.stage1_batch = 4 if args.tiny else 64
    args.stage2_batch = 4 if args.tiny else 32
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "tiny": args.tiny, "torch": torch.__version__}
    for name, fn in (("stage1", lambda: stage1_check(args, device)),):
        result[name] = fn()
        print(name, json.dumps(result[name]), flush=True)
    models = stage2_models(args, device)
    result["stage2"] = stage2_check(args, device, *models)
    print("stage2", json.dumps(result["stage2"]), flush=True)
    result["caption"] = caption_check(args, device, *models)
    print("caption", json.dumps(result["caption"]), flush=True)
    if device.type == "cuda":
        result["peak_device_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
