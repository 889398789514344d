"""Data pipeline throughput and memory: the Ray Data pipeline vs a plain single-process loop.

Decode + RandomResizedCrop/flip + normalise + Q-Former and LLM tokenisation of 256 px JPEGs from
WebDataset shards, the same code in both. Then the pipeline's peak memory (driver + Ray processes,
RSS sampled) with N and 2N shards of the same size: streaming keeps it flat.

The same work also runs in `--cpus` plain processes (multiprocessing, no Ray, files split between them):
the most this machine's cores give for this work, against which the pipeline's overhead shows. Rounds
run single, pipeline, processes, then the reverse. The machine's speed drifts by 10-30% within a minute
(the single loop alone has read 316-600 img/s in one session), so besides the ratio of the mean rates
each round's own ratios are printed, with their median and range: a single round says little.
Each pipeline run is a fresh Ray Data execution and pays its fixed start (about 1 s with one task
running while Ray Data learns the cluster's CPUs) and 0.1-0.25 s between one task's end and the next
dispatch, per shard file: 1,200 images per shard (img2dataset writes 10,000) keeps the bench to
minutes; "first batch after" shows the start.

    python bench/bench_data.py [--num 9600] [--shards 8] [--cpus 2] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time


def processes_run(pool, procs: int, files, cfg, toks) -> tuple[int, float, None]:
    """single_loop in the pool's processes, file i in process i % procs: the hardware ceiling.

    Timed from the first process's start to the last one's end of the work itself (imports and
    tokenizer loading happen before, as the single loop's warm-up does for it).
    """
    res = pool.starmap(_timed_loop, [(files[i::procs], cfg, toks) for i in range(procs)])
    return sum(n for n, _, _ in res), max(e for _, _, e in res) - min(b for _, b, _ in res), None


def _timed_loop(files, cfg, toks) -> tuple[int, float, float]:
    from blip2_ray.data.records import cached_llm_tokenizer, cached_qformer_tokenizer

    cached_qformer_tokenizer(toks["qformer"]), cached_llm_tokenizer(toks["opt"])
    begin = time.time()
    n, _, _ = single_loop(files, cfg, toks)
    return n, begin, time.time()


def single_loop(files, cfg, toks) -> tuple[int, float, float]:
    """(images, seconds, seconds to the first batch)."""
    from blip2_ray.data.readers import read_shard_records
    from blip2_ray.data.records import process_records

    t0, n, first = time.perf_counter(), 0, None
    for f in files:
        recs = list(read_shard_records(f, cfg.image_keys, cfg.caption_keys, lambda r: None))
        for i in range(0, len(recs), cfg.decode_batch_size):
            out = process_records(recs[i:i + cfg.decode_batch_size], cfg, train=True, on_skip=lambda r: None,
                                  qformer_tokenizer_path=toks["qformer"], llm_tokenizer_path=toks["opt"],
                                  llm_family="opt")
            n += len(out["key"])
            first = first or time.perf_counter() - t0
    return n, time.perf_counter() - t0, first


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


def pipeline_run(src, cfg, toks) -> tuple[int, float, float]:
    """(images, seconds, seconds to the first batch), like single_loop."""
    from blip2_ray.data.pipeline import build_dataset

    t0, n, first = time.perf_counter(), 0, None
    ds = build_dataset(cfg, src if isinstance(src, list) else [src], train=True, qformer_tokenizer=toks["qformer"],
                       llm_tokenizer=toks["opt"], llm_family="opt")
    for batch in ds.iter_batches(batch_size=cfg.decode_batch_size, batch_format="numpy", prefetch_batches=2):
        n += len(batch["key"])
        first = first or time.perf_counter() - t0
    return n, time.perf_counter() - t0, first


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=9600)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()

    import logging

    import ray

    from blip2_ray.config import from_dict
    from blip2_ray.data.config import DataConfig
    from blip2_ray.data.sources import list_shards
    from blip2_ray.fixtures.sample import make_sample_shards
    from blip2_ray.weights.tiny_tokenizers import build_tiny_tokenizers

    tmp = tempfile.mkdtemp(prefix="bench_data_")
    toks = build_tiny_tokenizers(os.path.join(tmp, "tok"))
    per_shard = args.num // args.shards
    src = os.path.join(tmp, "wds")
    make_sample_shards(src, num=args.num, shards=args.shards, image_size=256, seed=0)
    src2 = os.path.join(tmp, "wds2x")  # same shard size, twice the shards
    make_sample_shards(src2, num=per_shard * args.shards * 2, shards=args.shards * 2, image_size=256, seed=1)
    cfg = from_dict(DataConfig, {"image_size": 224, "decode_batch_size": 32})
    files = list_shards(src)

    single_loop(files[:1], cfg, toks)  # warm caches (tokenizers, imports)
    import multiprocessing as mp

    pool = mp.get_context("spawn").Pool(args.cpus)  # started before Ray: nothing of Ray in the children
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, _temp_dir=tempfile.mkdtemp(prefix="ray_", dir="/tmp"))
    ray.data.DataContext.get_current().enable_progress_bars = False
    order = ("single", "pipeline", "processes")
    rates: dict[str, list[float]] = {name: [] for name in order}
    firsts: dict[str, list[float]] = {name: [] for name in order}
    try:
        pipeline_run(files[: args.cpus], cfg, toks)  # start and warm one worker process per CPU
        for r in range(args.rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                if name == "single":
                    n, t, first = single_loop(files, cfg, toks)
                elif name == "processes":
                    n, t, first = processes_run(pool, args.cpus, files, cfg, toks)
                else:
                    with PeakRSS() as m1:
                        n, t, first = pipeline_run(src, cfg, toks)
                rates[name].append(n / t)
                firsts[name].append(first)
                print(f"round {r}: {name:<9} {n} images in {t:.2f} s: {n / t:.1f} images/s", flush=True)
        with PeakRSS() as m2:
            n3, t3, _ = pipeline_run(src2, cfg, toks)
    finally:
        ray.shutdown()
        pool.terminate()

    r1, r2, r4 = (sum(v) / len(v) for v in (rates["single"], rates["pipeline"], rates["processes"]))
    print(f"\n256 px JPEG -> 224 px train crop + BERT/OPT tokens; {args.num} images, {args.shards} shards")
    print(f"{'run':<38}{'images/s':>10}{'per core':>10}")
    print(f"{'single-process loop (1 core)':<38}{r1:>10.1f}{r1:>10.1f}")
    print(f"{f'Ray Data pipeline ({args.cpus} cores)':<38}{r2:>10.1f}{r2 / args.cpus:>10.1f}")
    print(f"{'Ray Data pipeline, 2x shards':<38}{n3 / t3:>10.1f}{n3 / t3 / args.cpus:>10.1f}")
    print(f"{f'{args.cpus} plain processes (ceiling, no Ray)':<38}{r4:>10.1f}{r4 / args.cpus:>10.1f}")
    print(f"speed-up pipeline / single loop: {r2 / r1:.2f}x (target >= 1.6x on 2 cores); "
          f"{args.cpus} plain processes / single loop: {r4 / r1:.2f}x")
    for a, b in (("pipeline", "single"), ("processes", "single"), ("pipeline", "processes")):
        per = [x / y for x, y in zip(rates[a], rates[b])]
        print(f"{a} / {b} per round: " + ", ".join(f"{x:.2f}" for x in per)
              + f"; median {statistics.median(per):.2f}x, range {min(per):.2f}-{max(per):.2f}x")
    print("first batch after (s, per round): single " + ", ".join(f"{x:.2f}" for x in firsts["single"])
          + "; pipeline " + ", ".join(f"{x:.2f}" for x in firsts["pipeline"]))
    gib = 1 << 30
    print(f"peak RSS (driver + Ray processes): {args.shards} shards {m1.peak / gib:.2f} GiB, "
          f"{2 * args.shards} shards {m2.peak / gib:.2f} GiB (ratio {m2.peak / max(m1.peak, 1):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
