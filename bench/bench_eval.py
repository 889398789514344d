"""CapFilt throughput: the Ray Data job with an actor pool vs a single-process loop, same models and data.

Tiny random models (the work per image is what counts, not caption quality) on generated shards:
K nucleus-sampled captions per image, ITC ranking, output shards written. Both runs in this process's
run, on the same machine, so the images/s are comparable.

    python bench/bench_eval.py [--num 256] [--shards 8] [--actors 2] [--captions 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, default=256, help="images")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--actors", type=int, default=2)
    p.add_argument("--captions", type=int, default=10, help="synthetic captions per image")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    import ray
    import torch

    from blip2_ray.capfilt.config import CapFiltConfig
    from blip2_ray.capfilt.job import run_capfilt
    from blip2_ray.capfilt.worker import CapFiltWorker
    from blip2_ray.config import from_dict, to_dict
    from blip2_ray.data.readers import list_shards
    from blip2_ray.data.sample import make_sample_shards
    from blip2_ray.model.builders import build_stage1, build_stage2
    from blip2_ray.model.config import model_config
    from blip2_ray.model.hf_format import export_stage1, export_stage2
    from blip2_ray.model.tokenizer_paths import llm_tokenizer, qformer_tokenizer

    work = tempfile.mkdtemp(prefix="bench_eval_")
    torch.manual_seed(0)
    mcfg = model_config("tiny")
    tok = llm_tokenizer(mcfg)
    export_stage2(build_stage2(mcfg, tok), f"{work}/captioner", tok, mcfg)
    export_stage1(build_stage1(mcfg), f"{work}/filter", qformer_tokenizer(mcfg), mcfg)
    make_sample_shards(f"{work}/in", "webdataset", num=args.num, shards=args.shards, image_size=32)

    def cfg(out: str) -> CapFiltConfig:
        return from_dict(CapFiltConfig, {
            "input": [f"{work}/in"], "output_dir": out,
            "captioner": {"model": f"{work}/captioner", "num_captions": args.captions,
                          "max_new_tokens": args.max_new_tokens, "min_new_tokens": 2},
            "filter": {"model": f"{work}/filter", "keep": 2},
            "compute": {"num_actors": args.actors, "batch_size": 32, "num_cpus_per_actor": 1},
            "data": {"image_size": 32}})

    # single process: the same worker class, one shard after the other
    single = cfg(f"{work}/out_single")
    os.makedirs(single.output_dir)
    t0 = time.perf_counter()
    w = CapFiltWorker(to_dict(single))
    n_single = sum(w.process_shard(f)["images"] for f in list_shards(f"{work}/in"))
    t_single = time.perf_counter() - t0
    torch_threads = torch.get_num_threads()

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    pool = cfg(f"{work}/out_pool")
    t0 = time.perf_counter()
    s = run_capfilt(pool)
    t_pool = time.perf_counter() - t0
    ray.shutdown()

    out = {"images": n_single, "captions_per_image": args.captions, "actors": args.actors,
           "single_process_images_per_s": n_single / t_single, "actor_pool_images_per_s": s["images"] / t_pool,
           "single_process_s": t_single, "actor_pool_s": t_pool, "torch_threads_single": torch_threads,
           "cpus": os.cpu_count(), "gpu": torch.cuda.is_available(),
           "note": "both include model loading; the pool's time includes actor start-up"}
    print(f"CapFilt, {n_single} images x {args.captions} captions, tiny models, {os.cpu_count()} CPUs"
          f"{' + GPU' if out['gpu'] else ''}:\n"
          f"  single process        {out['single_process_images_per_s']:8.1f} images/s ({t_single:.1f} s)\n"
          f"  actor pool ({args.actors} actors) {out['actor_pool_images_per_s']:8.1f} images/s ({t_pool:.1f} s)")
    if args.json:
        print(json.dumps(out))
    import shutil

    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
