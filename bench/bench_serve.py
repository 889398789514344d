"""`make bench-serve`: /v1/caption throughput and latency, batched vs one request at a time.

Starts its own local Ray + Serve on 127.0.0.1 with the tiny model saved in HF format, deploys it twice
(continuous batching of up to max_batch_size=B rows, and max_batch_size=1 with the same
max_ongoing_requests), and prints requests/s and p50/p99 latency at concurrency 1, 8 and 32 for each,
then the ratios (targets: >= 3x throughput at concurrency 32; p50 at concurrency 1 no worse than 1.2x).
The machine drifts within a minute: each round runs both variants (the order alternating between
rounds) and has its own ratios; the median over the rounds is the figure.

    python bench/bench_serve.py [--rounds 2] [--requests-per-level 96] [--max-new-tokens 20] [--max-batch-size 32]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import sys
import tempfile
import time

import numpy as np

from blip2_ray.runtime.cluster import free_port

CONCURRENCY = (1, 8, 32)


def tiny_model(out_dir: str) -> str:
    import torch

    from blip2_ray.model.config import model_config
    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.hf_format import export_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    torch.manual_seed(0)
    cfg = model_config("tiny")
    tok = llm_tokenizer(cfg)
    return export_stage2(build_stage2(cfg, tok), out_dir, tok, cfg)


def image_b64(seed: int) -> str:
    from PIL import Image

    arr = (np.random.RandomState(seed).rand(48, 64, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


async def load(url: str, concurrency: int, n: int, body_of) -> dict:
    """`n` POSTs from `concurrency` clients that each send their next request when the last one answers.

    aiohttp, not httpx: the load generator shares the 2 cores with the server, and aiohttp costs less
    CPU per request, leaving more to the system under test (the same client serves both variants).
    """
    import aiohttp

    latencies: list[float] = []
    batch_sizes: list[int] = []
    errors = 0
    queue = list(range(n))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:

        async def worker():
            nonlocal errors
            while queue:
                i = queue.pop()
                t = time.perf_counter()
                async with client.post(url, json=body_of(i)) as r:
                    await r.read()
                    latencies.append(time.perf_counter() - t)
                    if r.status != 200:
                        errors += 1
                    else:
                        batch_sizes.append(int(r.headers.get("x-batch-size", 1)))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {"rps": n / wall, "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
            "errors": errors, "mean_batch": float(np.mean(batch_sizes)) if batch_sizes else 0.0}


def model_only(model_dir: str, max_new_tokens: int, batch: int) -> None:
    """The model's own batching gain, without HTTP: `batch` requests at once vs one (1 torch thread)."""
    import torch

    from blip2_ray.serve.models import CaptionDeployment

    torch.set_num_threads(1)
    dep = CaptionDeployment(model_dir, max_batch_size=batch, batch_wait_timeout_s=0.005)
    items = [{"pixel_values": (np.random.RandomState(i).rand(3, 32, 32) * 255).astype(np.uint8), "prompt": "",
              "max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "num_beams": 1,
              "temperature": 0.0} for i in range(batch)]

    async def run(n: int) -> None:
        await asyncio.gather(*(dep.generate(it) for it in items[:n]))

    times = {}
    for n in (1, batch):
        asyncio.run(run(n))
        t = time.perf_counter()
        for _ in range(3):
            asyncio.run(run(n))
        times[n] = (time.perf_counter() - t) / 3
    print(f"model only (no HTTP): batch 1 {times[1] * 1000:.1f} ms, batch {batch} {times[batch] * 1000:.1f} ms "
          f"-> {batch * times[1] / times[batch]:.1f}x requests/s from batching")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests-per-level", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.002)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()

    import ray
    from ray import serve

    from blip2_ray.config import from_dict
    from blip2_ray.serve.app import build_app
    from blip2_ray.serve.config import ServeConfig

    os.environ.pop("RAY_ADDRESS", None)
    tmp = tempfile.mkdtemp(prefix="bench_serve_")
    model_dir = tiny_model(os.path.join(tmp, "tiny-opt"))
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray_", dir="/tmp"), log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    common = {"model": model_dir, "cpus_per_replica": 1.0, "max_queued_requests": -1,
              "ingress": {"cpus_per_replica": 0.5},
              "generation": {"max_new_tokens": args.max_new_tokens}}
    variants = {
        "batched": {**common, "max_batch_size": args.max_batch_size, "max_ongoing_requests": 2 * args.max_batch_size,
                    "batch_wait_timeout_s": args.batch_wait_timeout_s},
        # same queueing as "batched" (so Serve's router backs off no differently); the engine decodes one
        # row at a time
        "unbatched": {**common, "max_batch_size": 1, "max_ongoing_requests": 2 * args.max_batch_size},
    }
    for name, data in variants.items():
        serve.run(build_app(from_dict(ServeConfig, data), name_prefix=name), name=name, route_prefix=f"/{name}")
    images = [image_b64(i) for i in range(16)]

    def body_of(i: int) -> dict:  # min = max: every request does the same work
        return {"image": images[i % len(images)], "max_new_tokens": args.max_new_tokens,
                "min_new_tokens": args.max_new_tokens}

    throughput, p50 = [], []
    try:
        for name in variants:
            asyncio.run(load(f"http://127.0.0.1:{port}/{name}/v1/caption", 4, 16, body_of))  # warm-up
        for rnd in range(args.rounds):
            results: dict[tuple[str, int], dict] = {}
            for name in (list(variants) if rnd % 2 == 0 else list(variants)[::-1]):
                url = f"http://127.0.0.1:{port}/{name}/v1/caption"
                for c in CONCURRENCY:
                    n = max(args.requests_per_level // (2 if c == 1 else 1), 8)
                    results[name, c] = r = asyncio.run(load(url, c, n, body_of))
                    print(f"round {rnd + 1} {name:>9} c={c:<3} {r['rps']:7.1f} req/s  p50 {r['p50']:7.1f} ms  "
                          f"p99 {r['p99']:7.1f} ms  mean batch {r['mean_batch']:4.1f}  errors {r['errors']}",
                          flush=True)
            throughput.append(results["batched", 32]["rps"] / results["unbatched", 32]["rps"])
            p50.append(results["batched", 1]["p50"] / results["unbatched", 1]["p50"])
            print(f"round {rnd + 1}: c=32 throughput {throughput[-1]:.2f}x, c=1 p50 {p50[-1]:.2f}x", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    model_only(model_dir, args.max_new_tokens, args.max_batch_size)
    rounds = ", ".join(f"{x:.2f}" for x in throughput)
    print(f"throughput ratio at c=32 (batched / unbatched): median {float(np.median(throughput)):.2f}x "
          f"(rounds {rounds}; target >= 3x)")
    rounds = ", ".join(f"{x:.2f}" for x in p50)
    print(f"p50 ratio at c=1 (batched / unbatched): median {float(np.median(p50)):.2f}x (rounds {rounds}; "
          f"target <= 1.2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
