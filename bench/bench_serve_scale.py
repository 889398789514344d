"""Serving a real-size model on CPU (`make bench-serve-scale`): loading memory, first token, per-token latency.

A random model in the vitg_opt2.7b layout (real widths; `--depth` ViT and OPT blocks, 0 = the full 39 +
32), bf16, built with `allow_random_init` and exported once (a child process). A second child process:
(1) loads it as a caption replica does (`serve.placement.load_caption_model`: `load_stage2` in bf16),
reporting the peak RSS growth of that step (every weight read once afterwards, so memory-mapped
weights count once resident) / the weights' bytes (target <= 1.3x the bf16 weights); (2) streams a
32-token caption (greedy, min = max = 32 new tokens, no prompt, one 224x224 image) through the
replica's `GenerationEngine` and, on the SAME tensors (an HF model assembled from the project's
state dict: no second copy), transformers' `Blip2ForConditionalGeneration.generate` with a streamer;
rounds alternate the two sides. Reported per side (median over rounds): time to the first token
(request in -> first new token at the streaming side: the engine's event loop / HF's streamer) and the
mean latency of tokens 2..32; the ratio project / transformers per round (target: per-token <= 1.1x).
Not included: HTTP and Serve routing (`make bench-serve` measures the app; a few ms per request).

Usage: python bench/bench_serve_scale.py [--depth N] [--rounds 3] [--tokens 32] [--threads T]
(`make bench-serve-scale ARGS="--depth 8"`; full size, the default, needs ~11 GiB of free memory.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# the memory probes and the real-width model of bench-model-memory
from bench_model_memory import model_cfg, peak_rss_bytes, rss_bytes

GiB = 2**30


def build_child(depth: int, out_dir: str) -> dict:
    import torch

    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.hf_format import export_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    cfg = model_cfg(depth)
    tok = llm_tokenizer(cfg)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    export_stage2(build_stage2(cfg, tok), out_dir, tok, cfg)
    return {"seconds": time.perf_counter() - t0}


def hf_sharing(model, model_dir: str):
    """transformers' Blip2ForConditionalGeneration holding the project model's tensors (meta init + assign).

    HF runs `language_projection` in the LLM's dtype (it downcasts the Q-Former output before it), so that
    one small layer (Q-Former width x LLM width) is a bf16 copy; everything else is shared."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    state = dict(model.state_dict())
    dtype = model.language_model.dtype
    for k in [k for k in state if k.startswith("language_projection.")]:
        state[k] = state[k].to(dtype)
    with torch.device("meta"):
        hf = Blip2ForConditionalGeneration(Blip2Config.from_pretrained(model_dir))  # the exported config
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"HF model does not take the project's state: {missing[:3]} {unexpected[:3]}")
    hf.tie_weights()
    return hf.eval()


class TokenTimes:
    """A transformers streamer that records when each new token arrives (the first `put` is the prompt)."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def summary(start: float, times: list[float]) -> dict:
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"first_token_s": times[0] - start, "per_token_s": sum(gaps) / len(gaps), "tokens": len(times)}


def project_round(engine, item: dict) -> dict:
    times: list[float] = []
    advance = engine._advance

    def timed(row, token):  # when each token reaches the loop, where it is streamed from
        times.append(time.perf_counter())
        advance(row, token)

    async def run():
        engine._advance = timed
        try:
            start = time.perf_counter()
            first_chunk = None
            async for chunk in engine.submit(item, stream=True).chunks():
                first_chunk = first_chunk or time.perf_counter()
                if "done" in chunk:
                    return start, first_chunk, chunk["done"]
        finally:
            engine._advance = advance

    start, first_chunk, done = asyncio.run(run())
    assert done["completion_tokens"] == item["max_new_tokens"], done
    return {**summary(start, times), "first_chunk_s": first_chunk - start}


def hf_round(hf, pixels, tokens: int, eos: list[int]) -> dict:
    import torch

    streamer = TokenTimes()
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(pixel_values=pixels, max_new_tokens=tokens, min_new_tokens=tokens, num_beams=1,
                          do_sample=False, eos_token_id=eos, streamer=streamer)
    assert len(streamer.times) == tokens, (len(streamer.times), out.shape)
    return summary(start, streamer.times)


def serve_child(depth: int, model_dir: str, rounds: int, tokens: int, threads: int) -> dict:
    import numpy as np
    import torch

    from blip2_ray.model.caption_end import caption_stop_ids
    from blip2_ray.serve.engine import GenerationEngine
    from blip2_ray.serve.images import PixelNormalizer
    from blip2_ray.serve.placement import load_caption_model, tensor_bytes
    from blip2_ray.weights.checkpoint_files import stored_bytes
    from blip2_ray.weights.tokenizers import load_llm_tokenizer

    if threads:
        torch.set_num_threads(threads)
    from transformers import Blip2ForConditionalGeneration  # noqa: F401  (code in the baseline, not the load)

    before, t0 = rss_bytes(), time.perf_counter()
    model = load_caption_model(model_dir, "cpu", "bfloat16")
    load_s = time.perf_counter() - t0
    with torch.no_grad():  # read every weight once: memory-mapped ones count once they are resident
        for p in model.parameters():
            p.sum()
    growth = peak_rss_bytes() - before
    out = {"load_s": load_s, "growth": growth, "stored": stored_bytes(model),
           "bf16": tensor_bytes(model, torch.bfloat16), "dtypes": sorted({str(p.dtype) for p in model.parameters()})}

    tok = load_llm_tokenizer(model_dir)
    eos = caption_stop_ids(tok, model.llm_family)
    normalise = PixelNormalizer(model_dir, torch.device("cpu"))
    engine = GenerationEngine(model, tok, eos, normalise, max_batch_size=8)
    hf = hf_sharing(model, model_dir)
    out["growth_with_hf"] = peak_rss_bytes() - before
    image = np.random.RandomState(0).randint(0, 256, (3, 224, 224), dtype=np.uint8)
    pixels = normalise(image[None]).to(torch.bfloat16)
    item = {"pixel_values": image, "prompt": "", "max_new_tokens": tokens, "min_new_tokens": tokens,
            "num_beams": 1, "temperature": 0.0}
    project_round(engine, {**item, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up, both sides
    hf_round(hf, pixels, 4, eos)
    out["rounds"] = []
    for r in range(rounds):
        sides = [("project", lambda: project_round(engine, item)), ("hf", lambda: hf_round(hf, pixels, tokens, eos))]
        result = {}
        for name, run in sides if r % 2 == 0 else sides[::-1]:
            result[name] = run()
        out["rounds"].append(result)
    return out


def weight_gib(depth: int) -> float:
    """About the bf16 bytes of the model at `depth` (ViT-g block 25.2M, OPT-2.7B block 78.7M parameters,
    embeddings 130M, the float32 Q-Former 107M)."""
    vit, opt = (depth, depth) if depth else (39, 32)
    return (2 * (25.2e6 * vit + 78.7e6 * opt + 130e6) + 4 * 107e6) / GiB


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=0, help="ViT and OPT blocks (0: the full 39 + 32, ~7.4 GiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--child", choices=["build", "serve"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "build":
        print(json.dumps(build_child(args.depth, args.model_dir)))
        return
    if args.child == "serve":
        print(json.dumps(serve_child(args.depth, args.model_dir, args.rounds, args.tokens, args.threads)))
        return
    need, have = 1.3 * weight_gib(args.depth) + 1.5, available_gib()
    if need > have:
        sys.exit(f"bench_serve_scale: --depth {args.depth} needs about {need:.1f} GiB of free memory (the weights "
                 f"{weight_gib(args.depth):.1f} GiB, once per step), {have:.1f} GiB is available; use a smaller "
                 f"--depth")
    size = "full size (39 ViT + 32 OPT blocks)" if not args.depth else f"{args.depth} ViT + {args.depth} OPT blocks"
    print(f"vitg_opt2.7b layout, random bf16 weights, real widths, {size}; CPU, {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_serve_scale_") as d:
        base = [sys.executable, __file__, "--depth", str(args.depth), "--model-dir", d + "/m"]
        run = lambda *extra: json.loads(subprocess.run(  # noqa: E731
            [*base, *extra], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        built = run("--child", "build")
        print(f"  built and exported in {built['seconds']:.0f} s", flush=True)
        r = run("--child", "serve", "--rounds", str(args.rounds), "--tokens", str(args.tokens),
                "--threads", str(args.threads))
    print(f"  load (load_caption_model, bf16): {r['load_s']:.1f} s, peak RSS growth {r['growth'] / GiB:.2f} GiB = "
          f"{r['growth'] / r['bf16']:.2f}x the bf16 weights ({r['bf16'] / GiB:.2f} GiB; stored "
          f"{r['stored'] / GiB:.2f} GiB with the float32 Q-Former: {r['growth'] / r['stored']:.2f}x), target <= 1.3;"
          f" {r['dtypes']}; with the HF model on the same tensors {r['growth_with_hf'] / r['bf16']:.2f}x")
    for side in ("project", "hf"):
        first = statistics.median(x[side]["first_token_s"] for x in r["rounds"])
        per = statistics.median(x[side]["per_token_s"] for x in r["rounds"])
        name = "project (GenerationEngine, streamed)" if side == "project" else "transformers generate + streamer"
        extra = (f", first stream chunk {statistics.median(x[side]['first_chunk_s'] for x in r['rounds']):.3f} s"
                 if side == "project" else "")
        print(f"  {name:38s} first token {first:.3f} s{extra}, per token {per * 1000:.1f} ms (median of "
              f"{len(r['rounds'])} rounds, {args.tokens} tokens)")
    per_ratio = [x["project"]["per_token_s"] / x["hf"]["per_token_s"] for x in r["rounds"]]
    first_ratio = [x["project"]["first_token_s"] / x["hf"]["first_token_s"] for x in r["rounds"]]
    print(f"  project / transformers: per token {statistics.median(per_ratio):.3f}x (rounds "
          f"{', '.join(f'{x:.3f}' for x in per_ratio)}; target <= 1.1), first token "
          f"{statistics.median(first_ratio):.3f}x (rounds {', '.join(f'{x:.3f}' for x in first_ratio)})")


if __name__ == "__main__":
    main()
