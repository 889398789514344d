"""CapFilt throughput: the Ray Data job with an actor pool vs a single-process loop, and the paper's model
pair (BLIP captioner + CLIP filter) vs the BLIP-2 pair (stage-2 captioner + stage-1 ITC filter).

Tiny random models of one size (widths 32-48, 2 layers, 32 px images; the work per image is what counts,
not caption quality) on generated shards: K nucleus-sampled captions per image, ranking, output shards
written. Each round runs all four (2 pairs x single process / actor pool) in this process, on the same
images and machine, the pair order alternating between rounds; each round's own ratios (paper pair /
BLIP-2 pair, pool / single) are printed as their median and range: a shared machine drifts within minutes.

    python bench/bench_eval.py [--num 128] [--shards 8] [--actors 2] [--captions 10] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=128, help="images")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--captions", type=int, default=10, help="synthetic captions per image")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--rounds", type=int, default=3, help="measurement rounds (pair order alternating)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import ray
    import torch

    from blip2_ray.capfilt.config import CapFiltConfig
    from blip2_ray.capfilt.job import run_capfilt
    from blip2_ray.capfilt.worker import CapFiltWorker
    from blip2_ray.config import from_dict, to_dict
    from blip2_ray.data.sources import list_shards
    from blip2_ray.fixtures.capfilt_models import build_tiny_blip, build_tiny_clip
    from blip2_ray.fixtures.sample import make_sample_shards
    from blip2_ray.model.config import model_config
    from blip2_ray.weights.builders import build_stage1, build_stage2
    from blip2_ray.weights.hf_format import export_stage1, export_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer

    work = tempfile.mkdtemp(prefix="bench_eval_")
    torch.manual_seed(0)
    mcfg = model_config("tiny")
    tok = llm_tokenizer(mcfg)
    export_stage2(build_stage2(mcfg, tok), f"{work}/captioner", tok, mcfg)
    export_stage1(build_stage1(mcfg), f"{work}/filter", qformer_tokenizer(mcfg), mcfg)
    build_tiny_blip(f"{work}/blip-image-captioning-large")
    build_tiny_clip(f"{work}/clip-vit-large-patch14")
    make_sample_shards(f"{work}/in", "webdataset", num=args.num, shards=args.shards, image_size=32)
    sampling = {"num_captions": args.captions, "max_new_tokens": args.max_new_tokens, "min_new_tokens": 2}
    pairs = {
        "blip2": {"captioner": {"kind": "blip2", "model": f"{work}/captioner", **sampling},
                  "filter": {"kind": "blip2_itc", "model": f"{work}/filter", "keep": 2}},
        "paper": {"captioner": {"kind": "blip", "model": f"{work}/blip-image-captioning-large",
                                "prompt": "a picture of", "prepend_prompt": False, "repetition_penalty": 1.1,
                                **sampling},
                  "filter": {"kind": "clip", "model": f"{work}/clip-vit-large-patch14", "keep": 2}},
    }

    def cfg(pair: str, out: str) -> CapFiltConfig:
        return from_dict(CapFiltConfig, {
            "input": [f"{work}/in"], "output_dir": out, **pairs[pair],
            "compute": {"num_actors": args.actors, "batch_size": 32, "num_cpus_per_actor": 1},
            "data": {"image_size": 32}})

    def single_process(pair: str, r: int) -> float:
        """images/s of the same worker class, one shard after the other (model loading included); also
        records images per CPU-second of this process, which other load on a shared machine disturbs less."""
        c = cfg(pair, f"{work}/out_single_{pair}_{r}")
        os.makedirs(c.output_dir)
        t0, c0 = time.perf_counter(), time.process_time()
        w = CapFiltWorker(to_dict(c))
        n = sum(w.process_shard(f)["images"] for f in list_shards(f"{work}/in"))
        assert n == args.num
        runs[f"{pair}_single_per_cpu_s"].append(n / (time.process_time() - c0))
        return n / (time.perf_counter() - t0)

    def actor_pool(pair: str, r: int) -> float:
        """images/s of the Ray Data job (actor start-up included)."""
        t0 = time.perf_counter()
        n = run_capfilt(cfg(pair, f"{work}/out_pool_{pair}_{r}"))["images"]
        assert n == args.num
        return n / (time.perf_counter() - t0)

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    runs: dict[str, list[float]] = {f"{pair}_{mode}": [] for pair in pairs
                                    for mode in ("single", "pool", "single_per_cpu_s")}
    for r in range(args.rounds):
        order = list(pairs) if r % 2 == 0 else list(pairs)[::-1]  # alternate: the machine drifts within minutes
        for pair in order:
            runs[f"{pair}_single"].append(single_process(pair, r))
        for pair in order:
            runs[f"{pair}_pool"].append(actor_pool(pair, r))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in runs.items()) + " images/s", flush=True)
    ray.shutdown()

    med = {k: statistics.median(v) for k, v in runs.items()}
    ratios = {  # each round's own ratio (same round, same machine state), then their median and range
        "paper_vs_blip2_single_process": [p / b for p, b in zip(runs["paper_single"], runs["blip2_single"])],
        "paper_vs_blip2_actor_pool": [p / b for p, b in zip(runs["paper_pool"], runs["blip2_pool"])],
        "paper_vs_blip2_per_cpu_s": [p / b for p, b in zip(runs["paper_single_per_cpu_s"],
                                                           runs["blip2_single_per_cpu_s"])],
        "pool_vs_single_blip2": [p / s for p, s in zip(runs["blip2_pool"], runs["blip2_single"])],
        "pool_vs_single_paper": [p / s for p, s in zip(runs["paper_pool"], runs["paper_single"])],
    }
    out = {"images": args.num, "captions_per_image": args.captions, "actors": args.actors, "rounds": args.rounds,
           "single_process_images_per_s": med["blip2_single"], "actor_pool_images_per_s": med["blip2_pool"],
           "paper_pair_single_process_images_per_s": med["paper_single"],
           "paper_pair_actor_pool_images_per_s": med["paper_pool"],
           **{k: statistics.median(v) for k, v in ratios.items()},
           "per_round_images_per_s": runs, "per_round_ratios": ratios,
           "torch_threads_single": torch.get_num_threads(), "cpus": os.cpu_count(), "gpu": torch.cuda.is_available(),
           "note": "medians over rounds; all include model loading; the pool's times include actor start-up"}

    def ratio(k: str) -> str:
        v = ratios[k]
        return f"{statistics.median(v):5.2f}x ({min(v):.2f}-{max(v):.2f})"

    print(f"CapFilt, {args.num} images x {args.captions} captions, tiny models, {os.cpu_count()} CPUs"
          f"{' + GPU' if out['gpu'] else ''}, median of {args.rounds} rounds (range):\n"
          f"                        BLIP-2 pair (stage 2 + ITC)   paper pair (BLIP + CLIP)   paper / BLIP-2\n"
          f"  single process        {med['blip2_single']:8.1f} images/s          {med['paper_single']:8.1f} images/s"
          f"        {ratio('paper_vs_blip2_single_process')}\n"
          f"  actor pool ({args.actors} actors) {med['blip2_pool']:8.1f} images/s"
          f"          {med['paper_pool']:8.1f} images/s"
          f"        {ratio('paper_vs_blip2_actor_pool')}\n"
          f"  single, per CPU-s     {med['blip2_single_per_cpu_s']:8.1f} images/CPU-s"
          f"      {med['paper_single_per_cpu_s']:8.1f} images/CPU-s    {ratio('paper_vs_blip2_per_cpu_s')}\n"
          f"  pool / single         {ratio('pool_vs_single_blip2')}          {ratio('pool_vs_single_paper')}")
    if args.json:
        print(json.dumps(out))
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
