"""Fine-tuning costs, each pair of runs in one process: samples/s and peak memory per worker.

    DS_ACCELERATOR=cpu python bench/bench_finetune.py [--task caption|instruct|all] [--steps 40] [--workers 2]
        [--micro-batch 16] [--grad-checkpointing] [--lora-r 8]

caption: the ViT trained vs frozen. instruct: instruction tuning (ViT frozen) with the LLM frozen vs with LoRA
adapters on it (llm_lora.r, peft's default targets). Each pair: the tiny preset from the same random stage-2 export,
the same generated data packed into the same shards, the same batch, 2 Ray Train workers with DeepSpeed ZeRO-2,
fp32. The rate is the last logging window's (steps after the first half), so start-up and the first steps are
excluded; peak memory is the largest worker's host RSS (and device memory on GPUs). Reported as ratios of the
second run of the pair (trained ViT / LoRA) to the first.
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
    ap.add_argument("--task", choices=["caption", "instruct", "all"], default="all")
    ap.add_argument("--lora-r", type=int, default=8)
    args = ap.parse_args()

    import ray
    import torch

    from blip2_ray.model.config import model_config
    from blip2_ray.weights.builders import build_stage2
    from blip2_ray.weights.hf_format import export_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer

    work = tempfile.mkdtemp(prefix="bench_finetune_")
    cfg = model_config("tiny")
    tok = llm_tokenizer(cfg)
    torch.manual_seed(0)
    export_stage2(build_stage2(cfg, tok), f"{work}/start", tok, cfg)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=max(4, args.workers + 2), include_dashboard=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]}})
    if args.task in ("caption", "all"):
        caption_pair(args, work)
    if args.task in ("instruct", "all"):
        instruct_pair(args, work)
    ray.shutdown()
    return 0


def report(title: str, rows: dict, first: str, second: str) -> None:
    print(f"\n{title}")
    print(f"{'run':10s} {'samples/s':>10s} {'peak host GiB':>14s} {'peak device GiB':>16s}")
    for name, m in rows.items():
        print(f"{name:10s} {m['samples_per_s']:10.1f} {m['peak_host_rss_gib']:14.2f} "
              f"{m.get('peak_device_memory_gib') or float('nan'):16.2f}")
    t, f = rows[second], rows[first]
    print(f"{second} / {first}: throughput x{t['samples_per_s'] / f['samples_per_s']:.2f}, peak host memory "
          f"x{t['peak_host_rss_gib'] / f['peak_host_rss_gib']:.2f}", flush=True)


def train_settings(args) -> dict:
    return {"max_steps": args.steps, "global_batch_size": args.micro_batch * args.workers,
            "micro_batch_size": args.micro_batch, "lr": 1e-3, "warmup_steps": 2, "precision": "fp32",
            "log_every": args.steps // 2, "checkpoint_every": args.steps}


def instruct_pair(args, work: str) -> None:
    """Instruction tuning on the generated multi-task data, the LLM frozen vs with LoRA adapters."""
    from blip2_ray.config import from_dict
    from blip2_ray.fixtures.sample_instruct import TASK_TEMPLATES, make_instruct_sample
    from blip2_ray.model.config import model_config
    from blip2_ray.train.finetune_config import FinetuneConfig
    from blip2_ray.train.finetune_job import run_finetune
    from blip2_ray.weights.builders import build_stage1
    from blip2_ray.weights.hf_format import export_stage1
    from blip2_ray.weights.tokenizer_paths import qformer_tokenizer

    data = make_instruct_sample(f"{work}/instruct", num_train=256, num_test=4, image_size=32)
    cfg = model_config("tiny")
    export_stage1(build_stage1(cfg), f"{work}/stage1", qformer_tokenizer(cfg), cfg)
    kinds = {"colour": "vqa", "shape": "vqa", "count": "vqa", "describe": "caption", "chat": "conversation"}
    sources = [{"name": n, "kind": k, "train": data[f"{n}_train"], "image_root": data["image_root"]["train"],
                "templates": TASK_TEMPLATES[k]} for n, k in kinds.items()]
    rows = {}
    for r in (0, args.lora_r):
        name = "LoRA r%d" % r if r else "LLM frozen"
        run = f"bench_instruct_{r}_{time.time_ns()}"
        ft = from_dict(FinetuneConfig, {
            "task": "instruct", "run_name": run, "storage_path": f"{work}/runs", "output_dir": f"{work}/{run}",
            "model": {"init_from": f"{work}/start"}, "llm_lora": {"r": r, "save_adapter": False},
            "instruct": {"sources": sources, "held_in": list(kinds), "qformer_text_from": f"{work}/stage1"},
            "annotations": {"shard_records": 64}, "vision_training": {"freeze_vit": True},
            "data": {"image_size": 32, "shuffle_buffer": 64, "num_cpus_per_decode_task": 0.5, "llm_max_len": 48},
            "train": train_settings(args), "scaling": {"num_workers": args.workers, "cpus_per_worker": 1.0},
        })
        rows[name] = run_finetune(ft)["train"]
    report(f"instruct fine-tune, tiny preset, {args.workers} workers, micro batch {args.micro_batch}, {args.steps} "
           f"steps (rate of the last {args.steps // 2})", rows, "LLM frozen", "LoRA r%d" % args.lora_r)


def caption_pair(args, work: str) -> None:
    """Caption fine-tuning with the ViT frozen vs trained."""
    from blip2_ray.config import from_dict
    from blip2_ray.fixtures.sample_coco import make_coco_karpathy_sample
    from blip2_ray.train.finetune_config import FinetuneConfig
    from blip2_ray.train.finetune_job import run_finetune

    data = make_coco_karpathy_sample(f"{work}/coco", num_train=256, num_test=4, image_size=32)
    rows = {}
    for frozen in (True, False):
        run = f"bench_ft_{'frozen' if frozen else 'trained'}_{time.time_ns()}"
        ft = from_dict(FinetuneConfig, {
            "run_name": run, "storage_path": f"{work}/runs", "output_dir": f"{work}/{run}",
            "model": {"init_from": f"{work}/start", "llm": {"prompt": "a photo of "}},
            "annotations": {"train": data["train"], "image_root": data["image_root"]},
            "vision_training": {"freeze_vit": frozen, "grad_checkpointing": args.grad_checkpointing and not frozen},
            "data": {"image_size": 32, "shuffle_buffer": 64, "num_cpus_per_decode_task": 0.5},
            "train": train_settings(args), "scaling": {"num_workers": args.workers, "cpus_per_worker": 1.0},
        })
        rows["frozen" if frozen else "trained"] = run_finetune(ft)["train"]
    report(f"caption fine-tune (ViT), tiny preset, {args.workers} workers, micro batch {args.micro_batch}, "
           f"{args.steps} steps (rate of the last {args.steps // 2})", rows, "frozen", "trained")


if __name__ == "__main__":
    sys.exit(main())
