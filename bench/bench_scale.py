"""Paper-size stage 2 through Ray Train: ZeRO-2 against ZeRO-3, per-worker peak host memory and step time.

    DS_ACCELERATOR=cpu python bench/bench_scale.py [--preset vitg_opt2.7b] [--depth N] [--workers 2] [--steps 2]

The real training job (`run_pretrain`: Ray Data -> Ray Train TorchTrainer -> DeepSpeed) on generated
shapes shards at the preset's image size: stage 2 of `--preset` with random frozen parts
(`model.allow_random_init`), the ViT and the LLM stored in bfloat16, bf16 autocast on CPU (gloo), micro
batch 1 per worker, `--steps` optimizer steps, run once with ZeRO-2 and once with ZeRO-3 in the same
process (same Ray instance, same data). Reported per run: each worker's peak host RSS (ru_maxrss of the
Train worker process, reported by the job's own metrics at the last step: building, engine and steps,
before the export), the last step's time, and the frozen fraction each worker holds. `--depth N` keeps
N ViT blocks and N LLM blocks (same widths; 0 = the preset's depth: 39 + 32 for vitg_opt2.7b). Both
runs' workers get MALLOC_MMAP_THRESHOLD_=65536 (`--malloc-mmap-threshold`; 0 leaves glibc's default).

ZeRO-2 holds the whole bf16 model on every worker (~7.2 GiB for vitg_opt2.7b); ZeRO-3 builds the frozen
parts partitioned (train/zero3.py), so it should hold about 1/N of them. Target: zero3_peak_gib <=
0.6 x zero2_peak_gib. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_cfg(work: str, args, zero_stage: int):
    from blip2_ray.config import load_config
    from blip2_ray.model.config import model_config
    from blip2_ray.train.config import PretrainConfig

    image_size = model_config(args.preset, allow_random_init=True).vision.image_size
    sets = {
        "stage": 2, "run_name": f"bench_scale_z{zero_stage}_{time.time_ns()}", "storage_path": f"{work}/runs",
        "output_dir": f"{work}/export_z{zero_stage}", "data.train": f"[{work}/data]", "data.image_size": image_size,
        "data.shuffle_buffer": 4, "data.num_cpus_per_decode_task": 0.5, "data.decode_batch_size": 4,
        "model.preset": args.preset, "model.allow_random_init": True, "model.vision.dtype": "bfloat16",
        "model.llm.dtype": "bfloat16", "train.precision": "bf16", "train.max_steps": args.steps,
        "train.global_batch_size": args.workers, "train.micro_batch_size": 1, "train.warmup_steps": 1,
        "train.log_every": 1, "train.checkpoint_every": 1_000_000, "scaling.num_workers": args.workers,
        "scaling.cpus_per_worker": 1, "deepspeed.zero_stage": zero_stage, "failure.max_failures": 0,
    }
    if args.depth:
        sets.update({"model.vision.num_layers": args.depth, "model.llm.num_layers": args.depth})
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in sets.items()])


def run(work: str, args, zero_stage: int) -> dict:
    from blip2_ray.train.trainer import run_pretrain

    t0 = time.perf_counter()
    result = run_pretrain(make_cfg(work, args, zero_stage))
    if result.error is not None:
        raise result.error
    m = result.metrics
    return {"peak_rss_gib_per_worker": [round(x, 3) for x in m["peak_host_rss_gib_per_worker"]],
            "peak_rss_gib": round(m["peak_host_rss_gib"], 3), "step_s": round(1 / m["steps_per_s"], 2),
            "frozen_param_fraction_held": round(m["frozen_param_fraction_held"], 4), "loss": m["loss"],
            "run_s": round(time.perf_counter() - t0, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="vitg_opt2.7b")
    p.add_argument("--depth", type=int, default=0, help="ViT and LLM blocks kept (0: the preset's own depth)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--zero", default="2,3", help="ZeRO stages to run, in this order")
    p.add_argument("--malloc-mmap-threshold", type=int, default=65536,
                   help="MALLOC_MMAP_THRESHOLD_ of the Train workers, both runs (0: glibc's dynamic default)")
    args = p.parse_args()

    import ray

    from blip2_ray.fixtures.sample import make_sample_shards
    from blip2_ray.model.config import model_config

    work = tempfile.mkdtemp(prefix="bench_scale_")
    image_size = model_config(args.preset, allow_random_init=True).vision.image_size
    make_sample_shards(f"{work}/data", num=8 * args.workers * args.steps, shards=2, image_size=image_size, seed=0)
    os.environ.pop("RAY_ADDRESS", None)
    env = {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    if args.malloc_mmap_threshold:
        # glibc raises its mmap threshold after large frees, so freed gathered parameters stay in the heap
        # and count as resident; a fixed threshold returns them (docs/training.md, ZeRO-3 memory)
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    ray.init(address="local", num_cpus=args.workers + 2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env})
    depth = f"depth {args.depth}" if args.depth else "full depth"
    print(f"stage 2 {args.preset} ({depth}), bf16, {args.workers} workers, micro batch 1, {args.steps} steps, "
          f"CPU, {os.cpu_count()} cores", flush=True)
    out = {"preset": args.preset, "depth": args.depth or "full", "workers": args.workers, "steps": args.steps,
           "malloc_mmap_threshold": args.malloc_mmap_threshold}
    for stage in [int(s) for s in args.zero.split(",")]:
        r = run(work, args, stage)
        print(f"ZeRO-{stage}: peak RSS per worker {r['peak_rss_gib_per_worker']} GiB, last step {r['step_s']} s, "
              f"frozen held {r['frozen_param_fraction_held']:.3f}, run {r['run_s']} s", flush=True)
        out[f"zero{stage}"] = r
        out[f"zero{stage}_peak_gib"] = r["peak_rss_gib"]
        out[f"zero{stage}_step_s"] = r["step_s"]
    if "zero2_peak_gib" in out and "zero3_peak_gib" in out:
        out["zero3_over_zero2_peak"] = round(out["zero3_peak_gib"] / out["zero2_peak_gib"], 3)
        print(f"ZeRO-3 / ZeRO-2 per-worker peak: {out['zero3_over_zero2_peak']:.2f} (target <= 0.6)", flush=True)
    ray.shutdown()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
