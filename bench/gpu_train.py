"""Training on the GPU: the model step (eager and compiled) and the whole job, in one call (make bench-gpu-train).

    python bench/gpu_train.py --device cuda [--out results.json] [--budget-s 540] [--rows s1_64,s1_100,...]
    python bench/gpu_train.py --device cpu [--steps 6] [--rounds 2]        # the CPU proxy (docs/training.md)
    python bench/gpu_train.py --device cpu --rehearse                       # the GPU rows at tiny size on CPU
    python bench/gpu_train.py --device cpu --whole-graph                    # the proxy model as one graph

GPU (one H100/H200; random weights; bf16 autocast, bf16 ViT and OPT, as the job's GPU configs), rows in this
order until --budget-s runs out (a row not started is listed under "skipped"):
  s1_64, s1_100, s1_16   stage 1 (ViT-g/14 224 px + BERT-base Q-Former) at micro batch 64, 100, 16
  s2_32                  stage 2 (vitg_opt2.7b) at micro batch 32, also against transformers' step (same weights)
  ft_16                  caption fine-tune: stage 2 at 364 px with the ViT trained (gradient checkpointing), 16
Per row: the model step in this process (the job's model, bf16 autocast, torch AdamW, batch on the device)
eager and compiled (model/compile.py; compile seconds), the frozen ViT's forward alone on the same images, and
the whole job (`run_pretrain`: generated 256 px shards -> Ray Data -> 1 Ray Train worker -> DeepSpeed ZeRO-2,
train.compile on; its last window of steps); samples/s, job / compiled model step, step / ViT forward, host
syncs per step (torch.cuda sync debug mode), device peak. Targets (issue 24): job >= 0.95x its model step;
stage-1 step >= 0.6x the ViT forward at 100; stage 2 >= 1.5x transformers' step.

CPU proxy (--device cpu): the worker's micro step (`train.loop.micro_step`, in a DeepSpeed ZeRO-2 engine, world
size 1) at the real depth and a tiny width (39 ViT blocks, 12 Q-Former layers, widths 64, 56 px, micro batch 4,
float32: a CPU without bf16 units spends a bf16 step computing, e.g. 36 ms per attention backward, which a GPU
does not): there a step's time is per-operation overhead, what a GPU's host pays. Eager and compiled engines in
this process, alternating in rounds (ABBA); host time = the training thread's CPU time (on a shared machine wall
time mostly measures the wait for a core), per phase (data hand-off, forward, backward, optimizer, metrics).
`proxy_compiled_over_eager` = compiled / eager host time per step (target <= 0.5); `same_losses`: the compiled
engine's losses equal the eager one's (relative 2e-2) step by step (no dropout: the two paths draw dropout masks
from different generators; the hard negatives are drawn eagerly in both). `--precision bf16`: the GPU job's.

The last line printed is one JSON object (also --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROW_ORDER = ("s1_64", "s1_100", "s2_32", "s1_16", "ft_16")
ROWS = {  # name: (stage, micro batch, image size, caption fine-tune with the ViT trained)
    "s1_64": (1, 64, 224, False), "s1_100": (1, 100, 224, False), "s1_16": (1, 16, 224, False),
    "s2_32": (2, 32, 224, False), "ft_16": (2, 16, 364, True),
}
PROXY = {  # the CPU proxy: real depth, tiny width
    "model.vision.num_layers": 39, "model.vision.hidden_size": 64, "model.vision.intermediate_size": 256,
    "model.vision.num_heads": 4, "model.vision.image_size": 56, "model.vision.patch_size": 14,
    "data.image_size": 56, "model.qformer.num_layers": 12, "model.qformer.hidden_size": 64,
    "model.qformer.num_heads": 4, "model.qformer.intermediate_size": 256, "model.qformer.num_query_tokens": 32,
    "model.qformer.embed_dim": 32, "model.qformer.dropout": 0.0,
}


# ------------------------------------------------------------------------------------------- configs
def job_cfg(args, row: str, work: str, shards: str, steps: int, **extra):
    """The job's config of a row (PretrainConfig; FinetuneConfig for the fine-tune row)."""
    from blip2_ray.config import load_config
    from blip2_ray.train.config import PretrainConfig
    from blip2_ray.train.finetune_config import FinetuneConfig

    stage, mb, size, finetune = ROWS[row]
    sets = {
        "run_name": f"gpu_train_{row}_{time.time_ns()}", "storage_path": f"{work}/runs",
        "output_dir": f"{work}/out_{row}",
        "data.train": f"[{shards}]", "data.image_size": size, "model.vision.image_size": size,
        "data.num_cpus_per_decode_task": 1, "data.decode_batch_size": 64, "data.shuffle_buffer": 256,
        "train.global_batch_size": mb, "train.micro_batch_size": mb, "train.precision": "bf16",
        "train.max_steps": steps, "train.log_every": args.window, "train.checkpoint_every": 10**6,
        "train.warmup_steps": 10, "train.compile_backend": args.backend, "scaling.num_workers": 1,
        "deepspeed.zero_stage": 2, "failure.max_failures": 0,
        "model.allow_random_init": True, "model.vision.dtype": "bfloat16", "model.llm.dtype": "bfloat16",
        **extra,
    }
    if args.tiny:
        sets.update({"model.preset": "tiny", "model.vision.image_size": 32, "data.image_size": 32,
                     "model.vision.dtype": "float32", "model.llm.dtype": "float32"})
    else:
        sets.update({"model.preset": "vitg_opt2.7b"})
    if args.device == "cuda":
        sets.update({"scaling.use_gpu": True, "scaling.cpus_per_worker": 8})
    else:
        sets.update({"scaling.cpus_per_worker": 1, "data.num_cpus_per_decode_task": 0.5})
    if stage == 1:
        sets["stage"] = 1
    if finetune:
        sets.update({"task": "caption", "annotations.train": "generated-shards", "vision_training.freeze_vit": False,
                     "vision_training.grad_checkpointing": True})
        sets.pop("stage", None)
    else:
        sets["stage"] = stage
    return load_config(FinetuneConfig if finetune else PretrainConfig, None, [f"{k}={v}" for k, v in sets.items()])


# ---------------------------------------------------------------------------------------- measuring
def synchronize(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, iters: int, device) -> float:
    """Seconds per call of fn() after one warm-up call (device synchronised around the timing)."""
    fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / iters


def host_syncs(fn, device) -> int | None:
    """Device synchronisations during one call of fn() (CUDA sync debug mode warnings); None off CUDA."""
    import torch

    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in seen)


def step_inputs(args, cfg, device):
    """A micro batch on the device: pixels, caption ids of 20 tokens padded to 32 (as the pipeline pads), mask."""
    import torch

    mb, size = cfg.train.micro_batch_size, cfg.model.vision.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(mb, 3, size, size, generator=g).to(device)
    ids = torch.randint(5, 30 if args.tiny else 1000, (mb, 32), generator=g).to(device)
    ids[:, 0] = 2 if cfg.stage == 2 else 1
    mask = torch.ones_like(ids)
    mask[:, 20:] = 0
    return pixels, ids, mask


def model_step_row(args, cfg, device, hf_baseline: bool = False) -> dict:
    """The job's model (train.loop.build_model) in this process, built once: bf16 autocast, torch AdamW on the
    trainable parts, the batch on the device. Eager step, the frozen ViT's forward alone, transformers' step on
    the same weights (stage 2), then the same model compiled (model/compile.py, compile seconds) and its step."""
    import gc

    import torch

    from blip2_ray.model.compile import compile_model
    from blip2_ray.model.vision import vision_trunk
    from blip2_ray.train.loop import build_model

    pixels, ids, mask = step_inputs(args, cfg, device)
    mb = pixels.shape[0]
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    model = build_model(cfg).to(device).train()
    out: dict = {"micro_batch": mb, "image_size": cfg.model.vision.image_size, "build_s": time.perf_counter() - t0}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def forward():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return model(pixels, ids, mask).loss

    def step():
        forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for mode in ("eager", "compiled"):
        if mode == "compiled":
            regions = compile_model(model, args.backend)
            out["compile_s"] = regions.warm_up(forward, list(model.parameters()), time_limit_s=0)
            out["compiled_modules"] = len(regions.modules)
            out["compile_fallback"] = regions.fallback_reason
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out[f"{mode}_samples_per_s"] = mb / timed(step, args.iters, device)
        out[f"{mode}_host_syncs_per_step"] = host_syncs(step, device)
        if device.type == "cuda":
            out[f"{mode}_device_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if mode == "eager":
            with torch.no_grad():
                vit_s = timed(lambda: vision_trunk(model.vision_model, pixels), args.iters, device)
            out["vit_forward_images_per_s"] = mb / vit_s
            if hf_baseline:
                out.update(hf_stage2_row(args, model, pixels, ids, device))
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    out["compiled_over_eager"] = out["compiled_samples_per_s"] / out["eager_samples_per_s"]
    out["step_over_vit_forward"] = out["compiled_samples_per_s"] / out["vit_forward_images_per_s"]
    if hf_baseline:
        out["ours_compiled_over_hf"] = out["compiled_samples_per_s"] / out["hf_samples_per_s"]
    return out


def hf_stage2_row(args, ours, pixels, ids, device) -> dict:
    """transformers' Blip2ForConditionalGeneration step holding `ours`'s weights (stage 2's baseline): the same
    trainable parts, bf16 autocast, torch AdamW."""
    import torch
    from transformers import Blip2ForConditionalGeneration

    from blip2_ray.weights.hf_configs import _hf_from_state, stage2_hf_config

    image_token = ours.llm_embeddings().num_embeddings - 1  # a spare row, as the processor's <image>
    state = {k: v.detach().to("cpu", copy=True) for k, v in ours.state_dict().items()}
    hf = _hf_from_state(Blip2ForConditionalGeneration, stage2_hf_config(ours, image_token), state)
    del state
    hf.vision_model.requires_grad_(False)
    hf.language_model.requires_grad_(False)
    hf.vision_model.post_layernorm.requires_grad_(True)
    hf = hf.to(device).train()
    mb = pixels.shape[0]
    nq = hf.config.num_query_tokens
    hf_ids = torch.cat([torch.full((mb, nq), image_token, device=device), ids], 1)
    labels = torch.cat([torch.full((mb, nq + 1), -100, device=device), ids[:, 1:]], 1)
    opt = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = hf(pixel_values=pixels, input_ids=hf_ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"hf_samples_per_s": mb / timed(step, args.iters, device)}


def job_row(args, cfg) -> dict:
    """The whole job (run_pretrain) of `cfg`: its last window's rates (the first window holds start-up)."""
    from blip2_ray.train.trainer import run_pretrain

    t0 = time.perf_counter()
    result = run_pretrain(cfg)
    m = result.metrics
    return {"job_samples_per_s": m["samples_per_s"], "job_data_wait_fraction": m["data_wait_fraction"],
            "job_device_peak_gib": m.get("peak_device_memory_gib"), "job_loss": m["loss"],
            "job_wall_s": time.perf_counter() - t0}


def gpu_rows(args) -> dict:
    import gc

    import ray
    import torch

    from blip2_ray.fixtures.sample import make_sample_shards

    device = torch.device(args.device)
    t_start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="gpu_train_")
    shards = os.path.join(work, "shards")
    make_sample_shards(shards, num=512 if not args.tiny else 64, shards=8 if not args.tiny else 2,
                       image_size=256 if not args.tiny else 48, seed=0)
    num_cpus = os.cpu_count() if device.type == "cuda" else 4
    ray.init(address="local", num_cpus=num_cpus, num_gpus=1 if device.type == "cuda" else 0,
             include_dashboard=False, log_to_driver=args.verbose,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false",
                                       "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                                       **({"DS_ACCELERATOR": "cpu"} if device.type == "cpu" else {})}})
    result: dict = {"rows": {}, "skipped": []}
    for row in args.rows:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < args.row_min_s:
            result["skipped"].append(row)
            print(f"[gpu_train] {row}: skipped, {left:.0f} s of the budget left", flush=True)
            continue
        t0 = time.perf_counter()
        cfg = job_cfg(args, row, work, shards, args.job_steps)
        r = model_step_row(args, cfg, device, hf_baseline=ROWS[row][0] == 2 and not ROWS[row][3])
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.no_job:
            r.update(job_row(args, cfg))
            r["job_over_model_step"] = r["job_samples_per_s"] / r["compiled_samples_per_s"]
        r["row_wall_s"] = time.perf_counter() - t0
        result["rows"][row] = r
        print(f"[gpu_train] {row} " + json.dumps(r), flush=True)
        if args.out:  # what is done so far survives a timeout
            with open(args.out, "w") as f:
                json.dump(result, f)
        for d in (cfg.output_dir, os.path.join(work, "runs")):  # the exports and checkpoints (GBs at real size)
            shutil.rmtree(d, ignore_errors=True)
    ray.shutdown()
    return result


# ------------------------------------------------------------------------------------------ CPU proxy
def proxy_cfg(args, compiled: bool):
    from blip2_ray.config import load_config
    from blip2_ray.train.config import PretrainConfig

    mb = args.proxy_batch
    sets = {"stage": 1, "train.global_batch_size": mb, "train.micro_batch_size": mb, "scaling.num_workers": 1,
            "train.precision": args.precision,
            "model.vision.dtype": "bfloat16" if args.precision == "bf16" else "float32",
            "deepspeed.zero_stage": 2, "train.compile": compiled, "train.compile_backend": args.backend,
            "train.compile_time_limit_s": 0, **PROXY}
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in sets.items()])


def proxy_batches(cfg, n: int):
    """`n` micro batches as the data pipeline hands them over (TrainCollate's dict: uint8 pixels, token ids and
    mask, shard positions, keys)."""
    import numpy as np
    import torch

    mb, size, t = cfg.train.micro_batch_size, cfg.data.image_size, cfg.model.qformer.max_text_len
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(5, 30, (mb, t), generator=g)
        ids[:, 0] = 1
        mask = (torch.arange(t)[None] < torch.randint(8, t, (mb, 1), generator=g)).long()
        out.append({"pixel_values": torch.randint(0, 256, (mb, 3, size, size), dtype=torch.uint8, generator=g),
                    "qformer_input_ids": ids * mask, "qformer_attention_mask": mask,
                    "visit": np.zeros(mb, dtype=np.int64), "record": np.arange(i * mb, (i + 1) * mb),
                    "key": [f"{i}_{j}" for j in range(mb)]})
    return out


class ProxyWorker:
    """One engine and the worker loop's per-micro-step code around `train.loop.micro_step`: the batch from a
    BatchFeed (prepared in its thread), the step, the loss window and the trained rows, with its trace points."""

    def __init__(self, cfg, batches):
        from blip2_ray.train.data_position import TrainedRecords
        from blip2_ray.train.loop import build_engine
        from blip2_ray.train.metrics import LossWindow

        self.cfg, self.batches = cfg, batches
        self.engine = build_engine(cfg)
        self.engine.train()
        self.window, self.trained = LossWindow(), TrainedRecords(0)
        self.step, self.losses, self.first_step_s = 0, [], None

    def run(self, steps: int) -> float:
        """`steps` micro steps; host seconds."""
        import torch

        from blip2_ray.train.batches import BatchFeed, on_device
        from blip2_ray.train.loop import micro_step
        from blip2_ray.train.metrics import trace_step

        first = self.step
        source = ((0, dict(self.batches[(first + i) % len(self.batches)])) for i in range(steps))
        feed = BatchFeed(on_device(source, self.cfg, self.engine.device), 0, lambda s: RuntimeError("stall"))
        t0 = time.perf_counter()
        trace_step("step 0 report")  # the phase clock starts here
        try:
            for epoch, batch in feed:
                self.step += 1
                trace_step(f"step {self.step} data")
                torch.manual_seed(self.step)  # the same hard negatives for both engines
                out = micro_step(self.engine, self.cfg, batch, 0, self.step)
                self.window.add(out)
                self.trained.add(epoch, batch["visit"], batch["record"])
                trace_step(f"step {self.step} metrics")
                self.losses.append(float(out["loss"].detach()))
        finally:
            feed.close()
        return time.perf_counter() - t0


def proxy(args) -> dict:
    import numpy as np
    import torch
    import torch.distributed as dist

    from blip2_ray.train.metrics import STEP_PHASES

    torch.set_num_threads(1)  # a 1-CPU worker; and the machine is shared
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29541"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    # host time = the training thread's CPU time: on a shared machine wall time mostly measures the wait for a core
    STEP_PHASES.clock, STEP_PHASES.last = time.thread_time, None
    workers = {}
    for name in ("eager", "compiled"):
        cfg = proxy_cfg(args, name == "compiled")
        workers[name] = ProxyWorker(cfg, proxy_batches(cfg, 4))
    # first steps: the compiled engine compiles in its first micro step (train.loop.micro_step -> warm_up)
    first = {}
    for name, w in workers.items():
        first[name] = w.run(1)
        STEP_PHASES.take()
        w.run(1)  # a second warm step (allocator, lazy state)
        STEP_PHASES.take()
    compiled_regions = workers["compiled"].engine.module.compiled_regions
    phases = {name: {"seconds": dict.fromkeys(STEP_PHASES.seconds, 0.0), "steps": 0, "wall_s": 0.0}
              for name in workers}
    order = ["eager", "compiled"]
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else order[::-1]:  # ABBA: the machine's drift cancels
            phases[name]["wall_s"] += workers[name].run(args.steps)
            taken = STEP_PHASES.take()
            for k, v in taken["seconds"].items():
                phases[name]["seconds"][k] = phases[name]["seconds"].get(k, 0.0) + v
            phases[name]["steps"] += args.steps
    per_step = {name: {k: v / p["steps"] for k, v in p["seconds"].items() if k != "report"}
                for name, p in phases.items()}
    host = {name: sum(v.values()) for name, v in per_step.items()}
    eager_losses, compiled_losses = (np.array(workers[n].losses) for n in ("eager", "compiled"))
    rel = float(np.max(np.abs(compiled_losses - eager_losses) / np.abs(eager_losses)))
    dist.destroy_process_group()
    return {
        "proxy": {k: v for k, v in PROXY.items()} | {"micro_batch": args.proxy_batch, "precision": args.precision,
                                                     "backend": args.backend, "torch_threads": 1},
        "steps_per_engine": phases["eager"]["steps"], "rounds": args.rounds,
        "host_s_per_step": host, "phase_s_per_step": per_step, "clock": "thread CPU time",
        "wall_s_per_step": {n: p["wall_s"] / p["steps"] for n, p in phases.items()},
        "compile_s": compiled_regions.warm_up_s, "compile_fallback": compiled_regions.fallback_reason,
        "first_step_s": first, "compiled_modules": len(compiled_regions.modules),
        "loss_max_rel_diff": rel, "same_losses": bool(rel < 2e-2) and len(eager_losses) == len(compiled_losses),
        "proxy_compiled_over_eager": host["compiled"] / host["eager"],
        "target": "proxy_compiled_over_eager <= 0.5, same_losses",
    }


def whole_graph(args) -> dict:
    """The bound of compiling on this CPU: the proxy model's whole forward (ViT, Q-Former passes, objectives) as one
    inductor graph (fullgraph=True; its backward one AOT-autograd graph), against the same model eager; plain
    forward + backward, no DeepSpeed, no optimizer; host time = the thread's CPU time, ABBA rounds."""
    import torch

    from blip2_ray.train.loop import build_model

    torch.set_num_threads(1)
    cfg = proxy_cfg(args, False)
    model = build_model(cfg).train()
    batch = proxy_batches(cfg, 1)[0]
    x = batch["pixel_values"].float() / 255
    ids, mask = batch["qformer_input_ids"], batch["qformer_attention_mask"]
    compiled = torch.compile(model.forward, backend=args.backend, fullgraph=True, dynamic=False)

    def step(forward):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same hard negatives
        out = forward(x, ids, mask)
        out.loss.backward()
        return float(out.loss.detach())

    t0 = time.perf_counter()
    losses = {"compiled": step(compiled)}
    compile_s = time.perf_counter() - t0
    losses["eager"] = step(model.forward)
    host = {"eager": 0.0, "compiled": 0.0}
    for r in range(args.rounds):
        for name in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
            forward = compiled if name == "compiled" else model.forward
            t = time.thread_time()
            for _ in range(args.steps):
                step(forward)
            host[name] += (time.thread_time() - t) / (args.steps * args.rounds)
    return {"whole_graph": True, "proxy": PROXY | {"micro_batch": args.proxy_batch, "backend": args.backend},
            "compile_s": compile_s, "host_s_per_fwd_bwd": host, "first_losses": losses,
            "whole_graph_over_eager": host["compiled"] / host["eager"]}


def profile_job(args) -> dict:
    """The proxy model through the whole job (`run_pretrain`, 1 CPU Ray Train worker, ZeRO-2, generated 56 px
    shards), eager and compiled: the worker loop's own trace points (BLIP2_STEP_PROFILE), host seconds per micro
    step and phase, the first window (start-up, compilation) left out."""
    import ray

    from blip2_ray.config import load_config
    from blip2_ray.fixtures.sample import make_sample_shards
    from blip2_ray.train.config import PretrainConfig
    from blip2_ray.train.trainer import run_pretrain

    work = tempfile.mkdtemp(prefix="gpu_train_job_")
    make_sample_shards(f"{work}/shards", num=64, shards=2, image_size=64, seed=0)
    trace = f"{work}/phases.jsonl"
    ray.init(address="local", num_cpus=3, include_dashboard=False, log_to_driver=args.verbose,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
                                       "BLIP2_STEP_PROFILE": trace, "OMP_NUM_THREADS": "1",
                                       "PYTHONPATH": os.environ.get("PYTHONPATH", "")}})
    w, out = args.steps, {}
    for compiled in (False, True):
        name = "compiled" if compiled else "eager"
        mb = args.proxy_batch
        sets = {"stage": 1, "run_name": f"proxy_{name}_{time.time_ns()}", "storage_path": f"{work}/runs",
                "output_dir": f"{work}/out_{name}", "data.train": f"[{work}/shards]", "data.shuffle_buffer": 16,
                "data.num_cpus_per_decode_task": 0.5, "data.decode_batch_size": 16,
                "train.global_batch_size": mb, "train.micro_batch_size": mb, "train.max_steps": 3 * w,
                "train.log_every": w, "train.checkpoint_every": 10**6, "train.precision": args.precision,
                "model.vision.dtype": "bfloat16" if args.precision == "bf16" else "float32",
                "scaling.num_workers": 1, "scaling.cpus_per_worker": 1, "deepspeed.zero_stage": 2,
                "failure.max_failures": 0, "train.compile": compiled, "train.compile_backend": args.backend, **PROXY}
        open(trace, "w").close()
        t0 = time.perf_counter()
        result = run_pretrain(load_config(PretrainConfig, None, [f"{k}={v}" for k, v in sets.items()]))
        windows = [json.loads(line) for line in open(trace)][1:]  # the first holds start-up and compilation
        steps = sum(x["counts"]["forward"] for x in windows)
        phases = {k: sum(x["seconds"][k] for x in windows) / steps for k in windows[0]["seconds"]}
        out[name] = {"phase_s_per_step": phases, "host_s_per_step": sum(v for k, v in phases.items()),
                     "steps": steps, "samples_per_s": result.metrics["samples_per_s"],
                     "compile_mode": result.metrics["compile_mode"], "compile_s": result.metrics["compile_s"],
                     "wall_s": time.perf_counter() - t0}
        print(f"[gpu_train] job {name} " + json.dumps(out[name]), flush=True)
    ray.shutdown()
    out["job_compiled_over_eager"] = out["compiled"]["host_s_per_step"] / out["eager"]["host_s_per_step"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="cuda, cpu, or auto (cuda when there is one)")
    p.add_argument("--rehearse", action="store_true", help="with --device cpu: the GPU rows at tiny size")
    p.add_argument("--rows", default=",".join(ROW_ORDER), help=f"GPU rows, in order (of {', '.join(ROW_ORDER)})")
    p.add_argument("--budget-s", type=float, default=540, help="GPU rows: start no row after this many seconds")
    p.add_argument("--row-min-s", type=float, default=60, help="GPU rows: start a row only with this much left")
    p.add_argument("--iters", type=int, default=None, help="timed model steps per mode")
    p.add_argument("--job-steps", type=int, default=None, help="steps of each job run (its last window is measured)")
    p.add_argument("--window", type=int, default=None, help="the job's log window (train.log_every)")
    p.add_argument("--no-job", action="store_true", help="GPU rows: the model steps only")
    p.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"))
    p.add_argument("--steps", type=int, default=2, help="CPU proxy: micro steps per engine per round")
    p.add_argument("--rounds", type=int, default=8, help="CPU proxy: rounds (ABBA order)")
    p.add_argument("--proxy-batch", type=int, default=4)
    p.add_argument("--precision", default="fp32", choices=("bf16", "fp32"),
                   help="CPU proxy: fp32 (this CPU has no bf16 units: bf16 makes the tiny step compute-bound)")
    p.add_argument("--profile-job", action="store_true",
                   help="CPU: the proxy through the whole job on Ray (the worker loop's trace points), not in-process")
    p.add_argument("--whole-graph", action="store_true",
                   help="CPU: the proxy model's whole forward as one compiled graph against eager (no DeepSpeed)")
    p.add_argument("--verbose", action="store_true", help="the job workers' logs too")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args.tiny = args.device == "cpu"
    result = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__}
    if args.device == "cpu" and args.whole_graph:
        result.update(whole_graph(args))
    elif args.device == "cpu" and args.profile_job:
        result.update(profile_job(args))
    elif args.device == "cpu" and not args.rehearse:
        result.update(proxy(args))
    else:
        args.rows = [r for r in args.rows.split(",") if r]
        unknown = [r for r in args.rows if r not in ROWS]
        if unknown:
            p.error(f"unknown rows {unknown}; valid: {', '.join(ROW_ORDER)}")
        args.iters = args.iters or (10 if not args.tiny else 2)
        args.window = args.window or (10 if not args.tiny else 2)
        args.job_steps = args.job_steps or 3 * args.window
        result.update(gpu_rows(args))
    text = json.dumps(result)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
