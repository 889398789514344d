"""Cost of the distribution machinery: a Ray Train + DeepSpeed step vs the same step in a plain loop.

    DS_ACCELERATOR=cpu python bench/bench_train.py [--steps 40] [--warmup 10] [--micro-batch 16] [--stage 1]
        [--model-size tiny|small] [--rounds 2]

Both sides: the tiny preset, the same generated shapes shards through the same Ray Data pipeline,
the same model, AdamW groups and schedule, fp32, one torch thread. "plain" iterates the dataset in
this process and steps torch's AdamW; "ray+ds" is 1 Ray Train worker running the DeepSpeed ZeRO-2
engine (the real `train_loop_per_worker`). Rates are measured after `--warmup` steps (first window
excluded); checkpoint saving is outside the timed windows. Overhead = 1 - ray_rate / plain_rate.

The two run in rounds ordered plain, ray, ray, plain, ... (ABBA), and the rates are averaged per side:
this machine's speed drifts by 10-20% over minutes (shared vCPUs; the CPU time the hypervisor took,
"steal", is printed per run), and a single plain-then-ray pair measured that drift as much as the
machinery.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def make_cfg(work: str, args, num_workers: int, steps: int):
    from blip2_ray.config import load_config
    from blip2_ray.train.config import PretrainConfig

    sets = {
        "stage": args.stage, "run_name": f"bench_{time.time_ns()}", "storage_path": f"{work}/runs",
        "output_dir": f"{work}/export", "data.train": f"[{work}/data]", "data.image_size": 32,
        "data.shuffle_buffer": 64, "data.num_cpus_per_decode_task": 0.5, "data.decode_batch_size": 64,
        "train.max_steps": steps, "train.global_batch_size": args.micro_batch * num_workers,
        "train.micro_batch_size": args.micro_batch, "train.precision": "fp32", "train.warmup_steps": 5,
        "train.log_every": args.warmup, "train.checkpoint_every": 100_000, "scaling.num_workers": num_workers,
        "scaling.cpus_per_worker": 1, "deepspeed.zero_stage": 2, "failure.max_failures": 0,
    }
    if args.model_size == "small":  # a CPU-sized model whose step is not dominated by fixed per-step costs
        sets.update({
            "data.image_size": 112, "model.vision.image_size": 112, "model.vision.patch_size": 14,
            "model.vision.hidden_size": 256, "model.vision.intermediate_size": 1024, "model.vision.num_layers": 6,
            "model.vision.num_heads": 4, "model.qformer.hidden_size": 256, "model.qformer.num_layers": 4,
            "model.qformer.num_heads": 4, "model.qformer.intermediate_size": 1024,
            "model.qformer.num_query_tokens": 32, "model.qformer.embed_dim": 128,
        })
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in sets.items()])


def plain_loop(cfg, warmup: int) -> dict:
    """The same model step without Ray Train or DeepSpeed, batches from the same Ray dataset."""
    import ray
    import torch

    from blip2_ray.data.epoch_plan import epoch_plan, epoch_plan_name
    from blip2_ray.data.pipeline import iter_train_batches
    from blip2_ray.data.transforms import normalize_pixels_tensor
    from blip2_ray.train.loop import build_model
    from blip2_ray.train.optim import param_groups, warmup_cosine
    from blip2_ray.train.trainer import absolute_paths, build_train_dataset

    torch.set_num_threads(1)  # as the 1-CPU Train worker
    cfg = absolute_paths(cfg)
    model = build_model(cfg)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr,
                            betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.train.max_steps, cfg.train.warmup_steps,
                                                                 cfg.train.lr, cfg.min_lr))
    ds = build_train_dataset(cfg)
    step, t_start, wait = 0, None, 0.0
    epoch = 0
    plan = epoch_plan(epoch_plan_name(cfg.run_name))
    while step < cfg.train.max_steps:
        ray.get(plan.begin.remote(epoch))  # as rank 0 of the Train workers does
        it = iter(iter_train_batches(ds.iterator(), cfg.train.micro_batch_size, cfg.data, epoch=epoch))
        while step < cfg.train.max_steps:
            tw = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                break
            if t_start is not None:
                wait += time.perf_counter() - tw
            pixels = normalize_pixels_tensor(b["pixel_values"])  # uint8 rows, normalised where the model runs
            if cfg.stage == 1:
                out = model(pixels, b["qformer_input_ids"], b["qformer_attention_mask"])
            else:
                out = model(pixels, b["llm_input_ids"], b["llm_attention_mask"])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            if cfg.train.grad_clip > 0:  # as DeepSpeed's gradient_clipping
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            step += 1
            if step == warmup:
                t_start = time.perf_counter()
        epoch += 1
    elapsed = time.perf_counter() - t_start
    n = cfg.train.max_steps - warmup
    return {"steps_per_s": n / elapsed, "samples_per_s": n * cfg.train.global_batch_size / elapsed,
            "data_wait_fraction": wait / elapsed}


def ray_train(cfg) -> dict:
    from blip2_ray.train.trainer import run_pretrain

    result = run_pretrain(cfg)
    df = result.metrics_dataframe
    rows = df[df["step"] > cfg.train.log_every]  # the first window holds start-up and JIT costs
    t = (rows["step"].diff().fillna(cfg.train.log_every) / rows["steps_per_s"]).sum()
    n = len(rows) * cfg.train.log_every
    wait = (rows["data_wait_fraction"] * cfg.train.log_every / rows["steps_per_s"]).sum()
    return {"steps_per_s": n / t, "samples_per_s": n * cfg.train.global_batch_size / t, "data_wait_fraction": wait / t}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--stage", type=int, default=1, choices=(1, 2))
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers of the second run")
    p.add_argument("--model-size", choices=("tiny", "small"), default="tiny",
                   help="tiny: the test preset; small: hidden 256, 6-layer ViT at 112 px, 4-layer Q-Former")
    p.add_argument("--rounds", type=int, default=2,
                   help="runs of each side, ordered plain, ray, ray, plain, ... (drift cancels in the means)")
    args = p.parse_args()
    if args.steps % args.warmup:
        p.error("--steps must be a multiple of --warmup (the report window)")

    import ray

    from blip2_ray.fixtures.sample import make_sample_shards

    work = tempfile.mkdtemp(prefix="bench_train_")
    image_size = 112 if args.model_size == "small" else 32
    make_sample_shards(f"{work}/data", num=max(512, args.micro_batch * 32), shards=8, image_size=image_size, seed=0)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}})
    print(f"stage {args.stage}, {args.model_size} model, micro batch {args.micro_batch}, {args.steps} steps "
          f"({args.warmup} warm-up), fp32, CPU, {os.cpu_count()} cores, {args.rounds} rounds", flush=True)
    order = [("plain", "ray") if r % 2 == 0 else ("ray", "plain") for r in range(args.rounds)]
    runs: dict[str, list[dict]] = {"plain": [], "ray": []}
    label = {"plain": "plain loop (1 process)", "ray": f"Ray Train+DS ({args.workers}w)"}
    print(f"{'':24}{'steps/s':>10}{'samples/s':>12}{'data wait':>12}{'steal':>8}", flush=True)

    def show(name: str, r: dict) -> None:
        print(f"{label[name]:24}{r['steps_per_s']:10.2f}{r['samples_per_s']:12.1f}"
              f"{100 * r['data_wait_fraction']:11.1f}%{100 * r.get('steal', 0.0):7.1f}%", flush=True)

    for pair in order:
        for name in pair:
            c0 = _cpu_counters()
            if name == "plain":
                r = plain_loop(make_cfg(work, args, 1, args.steps), args.warmup)
            else:
                r = ray_train(make_cfg(work, args, args.workers, args.steps))
            r["steal"] = _steal_since(c0)
            runs[name].append(r)
            show(name, r)
    mean = {k: {m: sum(r[m] for r in v) / len(v) for m in v[0]} for k, v in runs.items()}
    print("mean of the rounds:")
    for name in ("plain", "ray"):
        show(name, mean[name])
    if args.workers == 1:
        print(f"overhead of Ray Train + DeepSpeed at 1 worker: "
              f"{100 * (1 - mean['ray']['steps_per_s'] / mean['plain']['steps_per_s']):.1f}% (target < 15%)")
    ray.shutdown()
    return 0


def _cpu_counters() -> tuple[int, int]:
    """(steal, total) CPU ticks since boot from /proc/stat; steal is time the hypervisor took."""
    try:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        return vals[7], sum(vals)
    except (OSError, IndexError, ValueError):
        return 0, 0


def _steal_since(start: tuple[int, int]) -> float:
    steal, total = _cpu_counters()
    return (steal - start[0]) / max(total - start[1], 1)


if __name__ == "__main__":
    sys.exit(main())
