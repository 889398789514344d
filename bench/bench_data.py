"""Data pipeline throughput and memory: the Ray Data pipeline vs a plain single-process loop.

Decode + RandomResizedCrop/flip + normalise + Q-Former and LLM tokenisation of 256 px JPEGs from
WebDataset shards, the same code in both. Then the pipeline's peak memory (driver + Ray processes,
RSS sampled) with N and 2N shards of the same size: streaming keeps it flat.

    python bench/bench_data.py [--num 1200] [--shards 6] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def single_loop(files, cfg, toks) -> tuple[int, float]:
    from blip2_ray.data.readers import read_shard_records
    from blip2_ray.data.records import process_records

    t0, n = time.perf_counter(), 0
    for f in files:
        recs = list(read_shard_records(f, cfg.image_keys, cfg.caption_keys, lambda r: None))
        for i in range(0, len(recs), cfg.decode_batch_size):
            out = process_records(recs[i:i + cfg.decode_batch_size], cfg, train=True, on_skip=lambda r: None,
                                  qformer_tokenizer_path=toks["qformer"], llm_tokenizer_path=toks["opt"])
            n += len(out["key"])
    return n, time.perf_counter() - t0


class PeakRSS:
    """Peak summed RSS of this process and all its descendants (the local Ray instance's processes)."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()

    def _total(self) -> int:
        total = 0
        for p in [self.proc] + self.proc.children(recursive=True):
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        return total

    def __enter__(self):
        self.base = self._total()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(0.05)

    def __exit__(self, *exc):
        self._stop.set()
        self.t.join()


def pipeline_run(src, cfg, toks) -> tuple[int, float]:
    from blip2_ray.data.pipeline import build_dataset

    t0, n = time.perf_counter(), 0
    ds = build_dataset(cfg, [src], train=True, qformer_tokenizer=toks["qformer"], llm_tokenizer=toks["opt"])
    for batch in ds.iter_batches(batch_size=cfg.decode_batch_size, batch_format="numpy", prefetch_batches=2):
        n += len(batch["key"])
    return n, time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=1200)
    p.add_argument("--shards", type=int, default=6)
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args()

    import logging

    import ray

    from blip2_ray.data.config import DataConfig
    from blip2_ray.data.readers import list_shards
    from blip2_ray.data.sample import make_sample_shards
    from blip2_ray.model.tokenizers import build_tiny_tokenizers

    tmp = tempfile.mkdtemp(prefix="bench_data_")
    toks = build_tiny_tokenizers(os.path.join(tmp, "tok"))
    per_shard = args.num // args.shards
    src = os.path.join(tmp, "wds")
    make_sample_shards(src, num=args.num, shards=args.shards, image_size=256, seed=0)
    src2 = os.path.join(tmp, "wds2x")  # same shard size, twice the shards
    make_sample_shards(src2, num=per_shard * args.shards * 2, shards=args.shards * 2, image_size=256, seed=1)
    cfg = DataConfig(image_size=224, decode_batch_size=32)
    files = list_shards(src)

    single_loop(files[:1], cfg, toks)  # warm caches (tokenizers, imports)
    n1, t1 = single_loop(files, cfg, toks)

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="ray_", dir="/tmp"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        pipeline_run(files[0], cfg, toks)  # warm the worker processes
        with PeakRSS() as m1:
            n2, t2 = pipeline_run(src, cfg, toks)
        with PeakRSS() as m2:
            n3, t3 = pipeline_run(src2, cfg, toks)
    finally:
        ray.shutdown()

    r1, r2 = n1 / t1, n2 / t2
    print(f"\n256 px JPEG -> 224 px train crop + CLIP norm + BERT/OPT tokens; {args.num} images, {args.shards} shards")
    print(f"{'run':<34}{'images':>8}{'seconds':>9}{'images/s':>10}{'per core':>10}")
    print(f"{'single-process loop (1 core)':<34}{n1:>8}{t1:>9.2f}{r1:>10.1f}{r1:>10.1f}")
    print(f"{f'Ray Data pipeline ({args.cpus} cores)':<34}{n2:>8}{t2:>9.2f}{r2:>10.1f}{r2 / args.cpus:>10.1f}")
    print(f"{f'Ray Data pipeline, 2x shards':<34}{n3:>8}{t3:>9.2f}{n3 / t3:>10.1f}{n3 / t3 / args.cpus:>10.1f}")
    print(f"speed-up pipeline / single loop: {r2 / r1:.2f}x (target >= 1.6x on 2 cores)")
    gib = 1 << 30
    print(f"peak RSS (driver + Ray processes): {args.shards} shards {m1.peak / gib:.2f} GiB, "
          f"{2 * args.shards} shards {m2.peak / gib:.2f} GiB (ratio {m2.peak / max(m1.peak, 1):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
