"""DeepSpeed's own per-step cost, without Ray: the same stage-1 step through torch's AdamW and through
DeepSpeed ZeRO-2 engines (contiguous gradient buffers on and off), alternating in one process, world 1.

    DS_ACCELERATOR=cpu python bench/bench_ds_step.py [--steps 12] [--model-size small|tiny]

Prints forward / backward / optimizer-step milliseconds per variant, and each engine's cost over the
plain step. This is what `deepspeed.contiguous_gradients: null` (off at 1 worker) was decided on.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--model-size", choices=("tiny", "small"), default="small")
    p.add_argument("--micro-batch", type=int, default=16)
    args = p.parse_args()

    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist
    from bench_train import make_cfg

    from blip2_ray.train.distributed import without_deepspeed_shm_kernel
    from blip2_ray.train.loop import build_model, outputs_as_dicts, vectorise_scalar_parameters
    from blip2_ray.train.optim import deepspeed_config, param_groups
    from blip2_ray.train.tasks import task_of

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo")
    without_deepspeed_shm_kernel()  # as the training worker
    cfg = make_cfg(tempfile.mkdtemp(prefix="bench_ds_"), argparse.Namespace(
        stage=1, micro_batch=args.micro_batch, model_size=args.model_size, warmup=10), 1, 40)
    torch.manual_seed(0)
    plain = build_model(cfg)
    opt = torch.optim.AdamW(param_groups(plain, cfg.train.weight_decay), lr=cfg.train.lr,
                            betas=tuple(cfg.train.betas), eps=cfg.train.eps)
    engines = {}
    for contiguous in (True, False):
        m = copy.deepcopy(plain)
        vectorise_scalar_parameters(m)
        outputs_as_dicts(m)
        ds_cfg = deepspeed_config(cfg)
        ds_cfg["zero_optimization"]["contiguous_gradients"] = contiguous
        engines[f"ZeRO-2, contiguous {'on' if contiguous else 'off'}"], *_ = deepspeed.initialize(
            model=m, model_parameters=param_groups(m, cfg.train.weight_decay), config=ds_cfg,
            dist_init_required=False)

    g = torch.Generator().manual_seed(0)
    b, s = args.micro_batch, cfg.model.vision.image_size
    batch = {"pixel_values": torch.randn(b, 3, s, s, generator=g),
             "qformer_input_ids": torch.randint(5, 100, (b, 16), generator=g),
             "qformer_attention_mask": torch.ones(b, 16, dtype=torch.long)}
    plain.train()

    def plain_step():
        t0 = time.perf_counter()
        out = plain(batch["pixel_values"], batch["qformer_input_ids"], batch["qformer_attention_mask"])
        t1 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        t2 = time.perf_counter()
        opt.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    def engine_step(engine):
        engine.train()
        t0 = time.perf_counter()
        out = task_of(cfg).forward(engine, batch, 0)
        t1 = time.perf_counter()
        engine.backward(out["loss"])
        t2 = time.perf_counter()
        engine.step()
        return t1 - t0, t2 - t1, time.perf_counter() - t2

    steps = {"plain AdamW": plain_step, **{k: (lambda e=e: engine_step(e)) for k, e in engines.items()}}
    times: dict[str, list] = {k: [] for k in steps}
    for i in range(args.steps + 3):  # interleaved; the first 3 rounds warm up
        for name, fn in steps.items():
            t = fn()
            if i >= 3:
                times[name].append(t)
    base = float(np.sum(np.mean(times["plain AdamW"], axis=0)))
    print(f"stage 1, {args.model_size} model, micro batch {args.micro_batch}, world 1, fp32, 1 thread, "
          f"{args.steps} interleaved steps each")
    print(f"{'':28}{'forward':>9}{'backward':>10}{'step':>8}{'total ms':>10}{'vs plain':>10}")
    for name, ts in times.items():
        f, bw, st = (1000 * x for x in np.mean(ts, axis=0))
        total = f + bw + st
        print(f"{name:28}{f:9.1f}{bw:10.1f}{st:8.1f}{total:10.1f}{100 * (total / 1000 / base - 1):9.1f}%")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
