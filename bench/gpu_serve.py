"""Serving decode speed: transformers' `generate`, the engine eager, the engine captured, on the same weights.

    python bench/gpu_serve.py --device cuda [--out DIR]        # make bench-gpu-serve (one call on a GPU machine)
    python bench/gpu_serve.py --device cpu                      # the CPU proxy (make bench-gpu-serve-proxy)
    python bench/gpu_serve.py --device cpu --int8-real-width    # int8 bytes and agreement at OPT-2.7B width

cuda: random weights in the vitg_opt2.7b layout (EVA ViT-g + OPT-2.7B), bf16, one 224 px image per request,
no prompt. For each way of decoding on the same model: transformers' `generate` (`Blip2Stage2.generate`,
DynamicCache), the engine eager (static slots, `decode_capture: off`), the engine with its decode step
captured as CUDA graphs (`cuda_graphs`) and compiled + captured (`compile`): a greedy 30-token caption at
batch 1 (latency, time to first token, per-token time = (latency - first token) / 29), and tokens/s with
1, 8, 32 and 64 concurrent rows (all submitted at once, 30 tokens each) through the engine. The weight-read
floor: the LLM's bytes / the device's copy bandwidth measured here (and / its nominal bandwidth). Then int8
(`llm_quantization: int8`): the LLM's bytes, batch-1 figures, and greedy-token agreement with bf16 on a
fixed set of images and prompts. HTTP is not in these figures (`make bench-serve`).

cpu (the proxy): a real-depth, tiny-width model (32 OPT blocks of width 64, tiny ViT and Q-Former), float32:
per-token time is then the per-operation overhead that capture removes. The engine eager and compiled
(inductor) in one process, batch 1: `proxy_compiled_over_eager` (per-token time, compiled / eager) and
`same_tokens` (the compiled engine's greedy tokens == the eager engine's == transformers' generate's).

`--int8-real-width` (cpu): the LLM at OPT-2.7B width in bf16, `--depth` blocks (tiny ViT and Q-Former): greedy-token
agreement of int8 with bf16 on a fixed set of images and prompts, and the bytes; the bytes of the whole
OPT-2.7B (32 blocks) counted exactly on the meta device.

Every section records its own error instead of stopping the run; `--budget-s` skips what would start after
it. The last line printed is one JSON object (also written to DIR/gpu_serve.json with --out).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
import traceback

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NEW_TOKENS = 30
# the proxy LLM's random weights: normal(0, 0.5), so that tokens change with the context; at std 1 a 32-block
# random network is chaotic (float32 rounding of 1e-7 grows to 1e-2 in the logits, float64 agrees to 1e-10)
PROXY_STD = 0.5
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}
PROMPTS = ["", "a photo of", "Question: what is in the picture? Answer:", "a picture of two"]


def log(*a) -> None:
    print(*a, flush=True)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ models
def build_model(args, device):
    """(model, tokenizer, config) with random weights: the GPU layout, the CPU proxy, or OPT-2.7B width."""
    import torch

    from blip2_ray.model.config import model_config
    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    if device.type == "cuda" and not args.tiny:
        cfg = model_config("vitg_opt2.7b", vision={"dtype": "bfloat16"}, llm={"dtype": "bfloat16"},
                           allow_random_init=True)
    elif args.int8_real_width:  # OPT-2.7B's LLM at full width and depth, the tiny ViT + Q-Former in front
        cfg = model_config("tiny", llm={"hidden_size": 2560, "num_layers": args.depth, "num_heads": 32,
                                        "ffn_size": 10240, "dtype": "bfloat16", "max_positions": 2048})
    else:  # the proxy: real depth, tiny width
        cfg = model_config("tiny", llm={"hidden_size": 64, "num_layers": 32, "num_heads": 4, "ffn_size": 256,
                                        "max_positions": 512})
    tok = llm_tokenizer(cfg)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_stage2(cfg, tok).eval()
    if device.type == "cpu" and not args.int8_real_width:
        with torch.no_grad():  # larger random weights: tokens that change with the context
            for p in list(model.language_model.parameters()) + list(model.language_projection.parameters()):
                if p.dim() == 2:
                    p.normal_(0, PROXY_STD)
    model = model.to(device)
    log(f"model built in {time.perf_counter() - t0:.1f} s: {cfg.llm.num_layers} LLM blocks of width "
        f"{cfg.llm.hidden_size}, {cfg.llm.dtype}")
    return model, tok, cfg


def images(model, seeds):
    """Random normalised images (n, 3, S, S), float32 numpy: what the engine's rows carry here."""
    import numpy as np

    s = model.vision_model.config.image_size
    return np.stack([np.random.RandomState(i).randn(3, s, s).astype(np.float32) for i in seeds])


def make_engine(model, tok, device, capture: str, rows: int, max_seq_len: int, backend: str = "inductor"):
    from blip2_ray.model.caption_end import caption_stop_ids
    from blip2_ray.serve.engine import GenerationEngine

    t0 = time.perf_counter()
    import torch

    engine = GenerationEngine(model, tok, caption_stop_ids(tok, model.llm_family),
                              lambda px: torch.from_numpy(px).to(device),
                              max_batch_size=rows, batch_wait_timeout_s=0, max_seq_len=max_seq_len,
                              capture=capture, compile_backend=backend)
    sync(device)
    start_s = time.perf_counter() - t0
    log(f"engine {capture}: started in {start_s:.1f} s, decode step runs {engine.slots.captured}"
        + (f" (capture failed: {engine.slots.capture_error})" if engine.slots.capture_error else ""))
    return engine, start_s


def item(px, prompt="", n=NEW_TOKENS, min_new=None) -> dict:
    return {"pixel_values": px, "prompt": prompt, "max_new_tokens": n,
            "min_new_tokens": n if min_new is None else min_new, "num_beams": 1, "temperature": 0.0}


# ------------------------------------------------------------------------------------------------ measurements
def engine_batch1(engine, px, device, reps: int) -> dict:
    """Batch-1 30-token caption through the engine: latency; time to first token = the latency of a 1-token
    request (prefill + first token); per-token time = (latency - first token) / 29 (as for `generate`)."""
    async def one(n):
        t0, c0 = time.perf_counter(), time.process_time()
        out = await engine.submit(item(px, n=n)).result()
        return time.perf_counter() - t0, time.process_time() - c0, out["token_ids"]

    def timed(n):
        runs = [asyncio.run(one(n)) for _ in range(reps + 1)]  # the first: warm-up
        return statistics.median(r[0] for r in runs[1:]), statistics.median(r[1] for r in runs[1:]), runs[-1][2]

    latency, cpu, tokens = timed(NEW_TOKENS)
    first, cpu_first, _ = timed(1)
    # per token: wall time, and this process's CPU time (both threads), which other jobs' load does not stretch
    return {"latency_s": latency, "first_token_s": first, "per_token_s": (latency - first) / (NEW_TOKENS - 1),
            "per_token_cpu_s": (cpu - cpu_first) / (NEW_TOKENS - 1), "tokens": tokens}


def engine_throughput(engine, model, device, concurrency: int) -> dict:
    """`concurrency` rows submitted at once, 30 tokens each: tokens/s of the whole."""
    px = images(model, range(concurrency))

    async def run():
        t0 = time.perf_counter()
        rows = [engine.submit(item(px[i])) for i in range(concurrency)]
        outs = [await r.result() for r in rows]
        return time.perf_counter() - t0, outs

    wall, outs = asyncio.run(run())
    tokens = sum(o["completion_tokens"] for o in outs)
    return {"rows": concurrency, "wall_s": wall, "tokens_per_s": tokens / wall,
            "mean_batch": statistics.mean(o["batch_size"] for o in outs)}


def engine_tokens(engine, model, device, cases) -> list[list[int]]:
    """Greedy tokens (up to 20, stopping at the caption end) of each (seed, prompt) case, all at once."""
    px = images(model, [s for s, _ in cases])

    async def run():
        rows = [engine.submit(item(px[i], p, n=20, min_new=1)) for i, (_, p) in enumerate(cases)]
        return [(await r.result())["token_ids"] for r in rows]

    return asyncio.run(run())


def hf_tokens(model, tok, device, cases) -> list[list[int]]:
    import torch

    from blip2_ray.model.caption_end import caption_stop_ids
    from blip2_ray.model.prompts import tokenize_prompts

    eos = caption_stop_ids(tok, model.llm_family)
    out = []
    for seed, prompt in cases:
        ids, mask = tokenize_prompts(tok, [prompt] if prompt else None, 1, model.llm_kind, device)
        px = torch.from_numpy(images(model, [seed])).to(device)
        row = model.generate(px, ids, mask, num_beams=1, max_new_tokens=20,
                             min_new_tokens=1, eos_token_id=eos)[0].tolist()
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        out.append(row if stop is None else row[: stop + 1])
    return out


def hf_batch1(model, px, device, reps: int) -> dict:
    """transformers' generate (Blip2Stage2.generate) of the same 30-token caption: latency, first token."""
    import torch

    def timed(n):
        times = []
        for _ in range(reps + 1):
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(torch.from_numpy(px[None]).to(device), num_beams=1, max_new_tokens=n,
                                     min_new_tokens=n)
            sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times[1:]), out[0].tolist()

    latency, tokens = timed(NEW_TOKENS)
    first, _ = timed(1)
    return {"latency_s": latency, "first_token_s": first, "per_token_s": (latency - first) / (NEW_TOKENS - 1),
            "tokens": tokens}


def divergences(model, tok, device, cases, got, reference) -> list[dict]:
    """Where `got` first differs from transformers' greedy tokens: the position, and the reference's margin
    there (top-1 minus top-2 logit; a near-tie is float noise, a large margin is a wrong result)."""
    import torch

    from blip2_ray.model.prompts import tokenize_prompts

    out = []
    for i, ((seed, prompt), a, b) in enumerate(zip(cases, got, reference)):
        k = next((j for j, (p, q) in enumerate(zip(a, b)) if p != q), None)
        if k is None:
            continue
        ids, mask = tokenize_prompts(tok, [prompt] if prompt else None, 1, model.llm_kind, device)
        embeds, full = model.llm_inputs(torch.from_numpy(images(model, [seed])).to(device), ids, mask)
        with torch.no_grad():
            gen = model.language_model.generate(inputs_embeds=embeds, attention_mask=full, max_new_tokens=k + 1,
                                                min_new_tokens=k + 1, do_sample=False, num_beams=1,
                                                output_scores=True, return_dict_in_generate=True,
                                                pad_token_id=tok.pad_token_id)
        top = gen.scores[k][0].float().topk(2).values
        out.append({"case": i, "position": k, "reference_margin": float(top[0] - top[1]),
                    "reference_top_logit": float(top[0])})
    return out


def bandwidth(device) -> dict:
    """Device memory bandwidth: a 2 GiB copy (bytes read + written) / its time, and the card's nominal figure."""
    import torch

    x = torch.empty(2**30, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    for _ in range(2):
        y.copy_(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync(device)
    measured = 2 * x.numel() * x.element_size() * 10 / (time.perf_counter() - t0)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = next((v for k, v in NOMINAL_BANDWIDTH.items() if k in name), None)
    del x, y
    return {"copy_bytes_per_s": measured, "nominal_bytes_per_s": nominal}


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Rows with identical greedy tokens, and the mean fraction of each row's tokens before the first difference."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = []
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(k / max(len(x), len(y), 1))
    return {"rows": len(a), "identical_rows": same, "identical_fraction": same / max(len(a), 1),
            "mean_agreeing_prefix": statistics.mean(prefix) if prefix else None}


class Sections:
    """Runs named sections under a time budget; a failure is recorded, never fatal."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s, self.result = time.perf_counter(), budget_s, {"sections": {}}

    def run(self, name: str, fn):
        elapsed = time.perf_counter() - self.t0
        if elapsed > self.budget_s:
            self.result["sections"][name] = f"skipped: {elapsed:.0f} s elapsed, budget {self.budget_s:.0f} s"
            log(name, "skipped (time budget)")
            return None
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - recorded in the JSON, the run goes on
            traceback.print_exc()
            self.result["sections"][name] = f"failed: {e.__class__.__name__}: {str(e)[:300]}"
            return None
        self.result["sections"][name] = f"ok in {time.perf_counter() - t0:.1f} s"
        return out


def free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------ the runs
def run_device(args, device) -> dict:
    """The full comparison (cuda; `--tiny` rehearses it at tiny size, on any device)."""
    import torch

    from blip2_ray.model.quantize import llm_weight_bytes, quantize_llm

    s = Sections(args.budget_s)
    r = s.result
    model, tok, cfg = build_model(args, device)
    r["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    r["llm_weight_bytes_bf16"] = llm_weight_bytes(model.language_model)
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = max(levels)
    px = images(model, [0])[0]
    cases = [(10 + i, PROMPTS[i % len(PROMPTS)]) for i in range(args.agreement_cases)]
    bw = s.run("bandwidth", lambda: bandwidth(device)) or {}
    r["bandwidth"] = bw
    if bw.get("copy_bytes_per_s"):
        r["floor_per_token_s"] = r["llm_weight_bytes_bf16"] / bw["copy_bytes_per_s"]
    if bw.get("nominal_bytes_per_s"):
        r["floor_per_token_nominal_s"] = r["llm_weight_bytes_bf16"] / bw["nominal_bytes_per_s"]
    r["hf_generate"] = s.run("hf_generate", lambda: hf_batch1(model, px, device, args.reps))
    reference = s.run("hf_tokens", lambda: hf_tokens(model, tok, device, cases))
    modes = ["off", "cuda_graphs", "compile"] if device.type == "cuda" else ["off", "compile"]
    best = None
    for mode in modes:
        def measure(mode=mode):
            engine, start_s = make_engine(model, tok, device, mode, rows, args.max_seq_len, args.backend)
            out = {"start_s": start_s, "decode_step": engine.slots.captured,
                   "capture_error": engine.slots.capture_error,
                   "kv_cache_bytes": engine.slots.cache_bytes(),
                   "batch1": engine_batch1(engine, px, device, args.reps)}
            log(mode, "batch 1:", json.dumps({k: v for k, v in out["batch1"].items() if k != "tokens"}))
            if reference is not None:
                out["agreement_with_generate"] = agreement(engine_tokens(engine, model, device, cases), reference)
            out["concurrency"] = {}
            for c in levels:
                out["concurrency"][c] = engine_throughput(engine, model, device, c)
                log(mode, f"{c} rows:", json.dumps(out["concurrency"][c]))
            engine._thread.shutdown()
            return out

        r[f"engine_{mode}"] = got = s.run(f"engine_{mode}", measure)
        free(device)
        if got is not None and got["decode_step"] != "off":
            best = mode
    summarise(r, best, levels)

    def int8():
        ref = engine_tokens_fresh(model, tok, device, best or "off", rows, args, cases)
        quantize_llm(model.language_model, "int8")
        out = {"llm_weight_bytes_int8": llm_weight_bytes(model.language_model)}
        out["bytes_int8_over_bf16"] = out["llm_weight_bytes_int8"] / r["llm_weight_bytes_bf16"]
        engine, _ = make_engine(model, tok, device, best or "off", rows, args.max_seq_len, args.backend)
        out["decode_step"] = engine.slots.captured
        out["batch1"] = engine_batch1(engine, px, device, args.reps)
        out["agreement_with_bf16"] = agreement(engine_tokens(engine, model, device, cases), ref)
        engine._thread.shutdown()
        return out

    r["int8"] = s.run("int8", int8)
    return r


def engine_tokens_fresh(model, tok, device, mode, rows, args, cases):
    engine, _ = make_engine(model, tok, device, mode, rows, args.max_seq_len, args.backend)
    try:
        return engine_tokens(engine, model, device, cases)
    finally:
        engine._thread.shutdown()
        free(device)


def summarise(r: dict, best: str | None, levels: list[int]) -> None:
    """The issue's targets, read off the sections."""
    if not best or not r.get(f"engine_{best}"):
        return
    e = r[f"engine_{best}"]
    out = {"mode": best, "batch1_latency_s": e["batch1"]["latency_s"], "per_token_s": e["batch1"]["per_token_s"]}
    if r.get("floor_per_token_s"):
        out["per_token_over_floor"] = e["batch1"]["per_token_s"] / r["floor_per_token_s"]
    if r.get("floor_per_token_nominal_s"):
        out["per_token_over_nominal_floor"] = e["batch1"]["per_token_s"] / r["floor_per_token_nominal_s"]
    if r.get("hf_generate"):
        out["batch1_latency_over_hf_generate"] = e["batch1"]["latency_s"] / r["hf_generate"]["latency_s"]
    conc = e["concurrency"]
    if 1 in conc and max(levels) in conc:
        out[f"tokens_per_s_{max(levels)}_over_1"] = conc[max(levels)]["tokens_per_s"] / conc[1]["tokens_per_s"]
    out["targets"] = {"batch1_latency_s": "<= 0.1", "per_token_over_floor": "<= 2",
                      "tokens_per_s_64_over_1": ">= 20"}
    r["summary"] = out


def run_proxy(args, device) -> dict:
    """CPU: real depth, tiny width; the eager and the compiled engine at batch 1, alternating rounds."""
    import torch

    torch.set_num_threads(1)  # width 64: no kernel has work to split; thread hand-offs would measure the load
    s = Sections(args.budget_s)
    r = s.result
    model, tok, cfg = build_model(args, device)
    r.update(device="cpu", llm_blocks=cfg.llm.num_layers, llm_width=cfg.llm.hidden_size, intra_op_threads=1)
    px = images(model, [0])[0]
    cases = [(10 + i, PROMPTS[i % len(PROMPTS)]) for i in range(args.agreement_cases)]
    reference = s.run("hf_tokens", lambda: hf_tokens(model, tok, device, cases))
    engines = {}
    for mode in ("off", "compile"):
        got = s.run(f"start_{mode}", lambda mode=mode: make_engine(model, tok, device, mode, 1, args.max_seq_len,
                                                                    args.backend))
        if got is not None:
            engines[mode] = got[0]
            r[f"start_{mode}_s"] = got[1]
    if "compile" in engines:
        r["decode_step"] = engines["compile"].slots.captured
        r["capture_error"] = engines["compile"].slots.capture_error
    per_token = {m: [] for m in engines}
    per_token_cpu = {m: [] for m in engines}
    for rnd in range(args.rounds):  # alternate: both see the same machine load
        for mode, engine in engines.items():
            got = s.run(f"round{rnd}_{mode}", lambda engine=engine: engine_batch1(engine, px, device, args.reps))
            if got is not None:
                per_token[mode].append(got["per_token_s"])
                per_token_cpu[mode].append(got["per_token_cpu_s"])
                log(f"round {rnd} {mode}: per token {got['per_token_s'] * 1e3:.2f} ms "
                    f"({got['per_token_cpu_s'] * 1e3:.2f} ms CPU), first token {got['first_token_s'] * 1e3:.1f} ms")
    r["per_token_s"], r["per_token_cpu_s"] = per_token, per_token_cpu
    if per_token.get("off") and per_token.get("compile"):
        ratios = [c / e for c, e in zip(per_token["compile"], per_token["off"])]
        cpu_ratios = [c / e for c, e in zip(per_token_cpu["compile"], per_token_cpu["off"])]
        r["round_ratios"], r["round_ratios_cpu"] = ratios, cpu_ratios
        r["proxy_compiled_over_eager"] = statistics.median(ratios)  # wall time per token
        r["proxy_compiled_over_eager_cpu"] = statistics.median(cpu_ratios)
    if reference is not None and len(engines) == 2:
        tokens = {m: engine_tokens(e, model, device, cases) for m, e in engines.items()}
        r["same_tokens"] = tokens["off"] == reference and tokens["compile"] == reference
        r["compiled_same_as_eager"] = tokens["compile"] == tokens["off"]
        r["distinct_reference_tokens"] = len({t for row in reference for t in row})  # a varied output
        r["agreement"] = {m: agreement(t, reference) for m, t in tokens.items()}
        r["divergences_from_generate"] = {m: divergences(model, tok, device, cases, t, reference)
                                          for m, t in tokens.items()}
    r["target"] = "proxy_compiled_over_eager <= 0.34 with same_tokens"
    for e in engines.values():
        e._thread.shutdown()
    return r


def full_size_bytes() -> dict:
    """OPT-2.7B (vitg_opt2.7b's LLM: 32 blocks of width 2560) built on the meta device, quantised there: its
    bytes in bf16 and in int8, counted from the tensors' shapes and dtypes (no memory)."""
    import torch

    from blip2_ray.model.config import model_config
    from blip2_ray.model.quantize import llm_weight_bytes, quantize_llm
    from blip2_ray.weights.language_model import build_language_model

    cfg = model_config("vitg_opt2.7b", llm={"dtype": "bfloat16"}, allow_random_init=True)
    with torch.device("meta"):
        lm = build_language_model(cfg, cfg.llm.vocab_size)
        bf16 = llm_weight_bytes(lm)
        layers = quantize_llm(lm, "int8")
    int8 = llm_weight_bytes(lm)
    return {"llm": "OPT-2.7B", "blocks": cfg.llm.num_layers, "quantised_layers": layers, "bytes_bf16": bf16,
            "bytes_int8": int8, "bytes_int8_over_bf16": int8 / bf16}


def run_int8_real_width(args, device) -> dict:
    """CPU: the LLM at OPT-2.7B width (and `--depth` blocks) in bf16: int8 bytes and greedy agreement."""
    import torch

    from blip2_ray.model.quantize import llm_weight_bytes, quantize_llm

    s = Sections(args.budget_s)
    r = s.result
    r["full_size"] = s.run("full_size_bytes", full_size_bytes)
    model, tok, cfg = build_model(args, device)
    r.update(device="cpu", llm_blocks=cfg.llm.num_layers, llm_width=cfg.llm.hidden_size, dtype="bfloat16")
    cases = [(10 + i, PROMPTS[i % len(PROMPTS)]) for i in range(args.agreement_cases)]
    r["llm_weight_bytes_bf16"] = llm_weight_bytes(model.language_model)
    with torch.no_grad():
        ref = s.run("bf16_tokens", lambda: engine_tokens_fresh(model, tok, device, "off", len(cases), args, cases))
        quantize_llm(model.language_model, "int8")
        r["llm_weight_bytes_int8"] = llm_weight_bytes(model.language_model)
        r["bytes_int8_over_bf16"] = r["llm_weight_bytes_int8"] / r["llm_weight_bytes_bf16"]
        got = s.run("int8_tokens", lambda: engine_tokens_fresh(model, tok, device, "off", len(cases), args, cases))
    if ref is not None and got is not None:
        r["agreement"] = agreement(got, ref)
        r["tokens_bf16"], r["tokens_int8"] = ref, got
    r["target"] = "bytes_int8_over_bf16 <= 0.55; agreement reported"
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the full comparison at tiny size (a rehearsal, any device)")
    p.add_argument("--int8-real-width", action="store_true", help="cpu: int8 bytes + agreement at OPT-2.7B width")
    p.add_argument("--depth", type=int, default=8, help="LLM blocks of --int8-real-width (its bytes at 32: exact, "
                                                        "on the meta device)")
    p.add_argument("--concurrency", default=None, help="rows at once (default 1,8,32,64 on cuda, 1,4 with --tiny)")
    p.add_argument("--max-seq-len", type=int, default=80, help="KV-cache slot: 32 queries + prompt + 30 tokens")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=3, help="proxy: alternating eager/compiled rounds")
    p.add_argument("--agreement-cases", type=int, default=None)
    p.add_argument("--backend", default="inductor", help="torch.compile backend of the compiled decode step")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="skip sections that would start later")
    p.add_argument("--out", default=None, help="directory: also write gpu_serve.json there")
    args = p.parse_args()
    import torch

    device = torch.device(args.device)
    full = device.type == "cuda" and not args.tiny
    args.concurrency = args.concurrency or ("1,8,32,64" if full else "1,4")
    args.reps = args.reps or (5 if full else 2)
    args.agreement_cases = args.agreement_cases or (16 if full or args.int8_real_width else 4)
    if args.int8_real_width:
        result = run_int8_real_width(args, device)
    elif device.type == "cuda" or args.tiny:
        result = run_device(args, device)
    else:
        result = run_proxy(args, device)
    result.update(torch=torch.__version__, transformers=__import__("transformers").__version__)
    if device.type == "cuda":
        result["peak_device_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    text = json.dumps(result, default=str)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_serve.json"), "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
