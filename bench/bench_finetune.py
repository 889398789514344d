"""Caption fine-tuning with the ViT trained vs frozen: samples/s and peak memory per worker, same process.

    DS_ACCELERATOR=cpu python bench/bench_finetune.py [--steps 40] [--workers 2] [--micro-batch 16]
        [--grad-checkpointing]

Both runs: the tiny preset from the same random stage-2 export, the same generated COCO-Karpathy data packed
into the same shards, 2 Ray Train workers with DeepSpeed ZeRO-2, fp32. The rate is the last logging window's
(steps after the first half), so start-up and the first steps are excluded; peak memory is the largest
worker's host RSS (and device memory on GPUs). Reported as ratios of the trained-ViT run to the frozen one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--grad-checkpointing", action="store_true")
    args = ap.parse_args()

    import ray
    import torch

    from blip2_ray.config import from_dict
    from blip2_ray.fixtures.sample_coco import make_coco_karpathy_sample
    from blip2_ray.model.config import model_config
    from blip2_ray.train.finetune_config import FinetuneConfig
    from blip2_ray.train.finetune_job import run_finetune
    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.hf_format import export_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    work = tempfile.mkdtemp(prefix="bench_finetune_")
    data = make_coco_karpathy_sample(f"{work}/coco", num_train=256, num_test=4, image_size=32)
    cfg = model_config("tiny")
    tok = llm_tokenizer(cfg)
    torch.manual_seed(0)
    export_stage2(build_stage2(cfg, tok), f"{work}/start", tok, cfg)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=max(4, args.workers + 2), include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]}})
    rows = {}
    for frozen in (True, False):
        run = f"bench_ft_{'frozen' if frozen else 'trained'}_{time.time_ns()}"
        ft = from_dict(FinetuneConfig, {
            "run_name": run, "storage_path": f"{work}/runs", "output_dir": f"{work}/{run}",
            "model": {"init_from": f"{work}/start", "llm": {"prompt": "a photo of "}},
            "annotations": {"train": data["train"], "image_root": data["image_root"]},
            "vision_training": {"freeze_vit": frozen, "grad_checkpointing": args.grad_checkpointing and not frozen},
            "data": {"image_size": 32, "shuffle_buffer": 64, "num_cpus_per_decode_task": 0.5},
            "train": {"max_steps": args.steps, "global_batch_size": args.micro_batch * args.workers,
                      "micro_batch_size": args.micro_batch, "lr": 1e-3, "warmup_steps": 2, "precision": "fp32",
                      "log_every": args.steps // 2, "checkpoint_every": args.steps},
            "scaling": {"num_workers": args.workers, "cpus_per_worker": 1.0},
        })
        rows["frozen" if frozen else "trained"] = run_finetune(ft)["train"]
    ray.shutdown()
    print(f"\ncaption fine-tune, tiny preset, {args.workers} workers, micro batch {args.micro_batch}, "
          f"{args.steps} steps (rate of the last {args.steps // 2})")
    print(f"{'ViT':10s} {'samples/s':>10s} {'peak host GiB':>14s} {'peak device GiB':>16s}")
    for name, m in rows.items():
        print(f"{name:10s} {m['samples_per_s']:10.1f} {m['peak_host_rss_gib']:14.2f} "
              f"{m.get('peak_device_memory_gib') or float('nan'):16.2f}")
    t, f = rows["trained"], rows["frozen"]
    print(f"trained / frozen: throughput x{t['samples_per_s'] / f['samples_per_s']:.2f}, peak host memory "
          f"x{t['peak_host_rss_gib'] / f['peak_host_rss_gib']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
