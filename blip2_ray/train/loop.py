"""The Ray Train worker: DeepSpeed ZeRO on the Q-Former, checkpoints through `ray.train.report`, export.

One function, `train_loop_per_worker(config)`, runs on every worker. `config["cfg"]` is the job's
`to_dict(PretrainConfig)`; the worker rebuilds and re-validates it. Per optimizer step: `grad_accum`
micro batches from this worker's dataset shard (train/batches.py) -> forward under autocast ->
engine.backward -> engine.step.

Data position on resume (train/data_position.py): every row carries its shard visit and record number;
each checkpoint records the epoch, the visits trained to their end and a bitmap of the trained records of
the others. A resumed run (a resubmitted job, or the worker group restarted after a crash) hands that to
the run's EpochPlan, which leaves the consumed visits out of the epoch and has the decode tasks skip the
trained records of the partial ones: within an epoch no record is trained twice across a resume and none
is lost (rows still in a shuffle buffer at the checkpoint come again); the resume decodes only what it
has not trained.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zlib

import torch

from blip2_ray.config import from_dict
from blip2_ray.train.batches import (
    BatchFeed,
    DataStallError,
    device_tensors,
    epoch_batches,
    on_device,
    stall_message,
    to_device,
)
from blip2_ray.train.compile_step import compile_for_training, warm_up
from blip2_ray.train.config import PretrainConfig
from blip2_ray.train.data_position import DataPosition, TrainedRecords, merge_position
from blip2_ray.train.distributed import all_gather_no_grad, all_gather_with_grad
from blip2_ray.train.finetune_config import FinetuneConfig
from blip2_ray.train.finetune_model import finetune_model, vit_lr_scale
from blip2_ray.train.metrics import LossWindow, log_step, tensorboard, trace_memory, trace_step
from blip2_ray.train.optim import deepspeed_config, param_groups, warmup_cosine

STATE_FILE = "train_state.json"
DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every Ray checkpoint directory


# ----------------------------------------------------------------------------------- model pieces
def build_model(cfg: PretrainConfig) -> torch.nn.Module:
    """The stage's model, seeded: random frozen parts are identical on every rank and every restart.

    ZeRO-3 (the process group must exist): the frozen ViT / LLM are built partitioned over the ranks
    (train/zero3.py), never whole on one worker; weight files are read into each rank's slices.
    """
    from blip2_ray.model.builders import build_stage1, build_stage2

    construction = None
    if cfg.deepspeed.zero_stage == 3:
        from blip2_ray.train.zero3 import frozen_construction, gloo_collectives_in_place

        gloo_collectives_in_place()
        construction = frozen_construction(deepspeed_config(cfg))
    trace_memory("construction")
    torch.manual_seed(cfg.train.seed)
    build = build_stage1 if cfg.stage == 1 else build_stage2
    model = build(cfg.model, construction=construction)
    if isinstance(cfg, FinetuneConfig):
        finetune_model(model, cfg)
    return model


def build_engine(cfg: PretrainConfig):
    """The seeded model inside a DeepSpeed engine (the process group of this worker must exist).

    Precision (docs/training.md): the engine runs its forward under torch.autocast (train.precision) and
    casts no parameter: trainable ones stay float32 (the master weights), the frozen ViT/LLM keep the dtype
    they are stored in.
    """
    import deepspeed

    model = build_model(cfg)
    trace_memory("built")
    lr_scale = vit_lr_scale(model, cfg) if isinstance(cfg, FinetuneConfig) else None
    sched = warmup_cosine(cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.lr, cfg.min_lr,
                          cfg.train.warmup_start_lr)
    vectorise_scalar_parameters(model)
    outputs_as_dicts(model)
    compile_for_training(model, cfg)  # train.compile: regions compiled at the first micro batch (compile_step.py)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay, lr_scale=lr_scale, lr=cfg.train.lr),
        config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched),
        dist_init_required=False,
    )
    if cfg.deepspeed.zero_stage == 3:
        from blip2_ray.train.zero3 import share_fp32_partitions

        share_fp32_partitions(engine.optimizer)
    trace_memory("engine")
    return engine


def forward(engine, cfg: PretrainConfig, batch: dict, rank: int):
    """One micro batch through the engine (pixels normalised on its device) -> a StepOutput."""
    pixels, ids, mask = to_device(batch, engine.device, cfg)
    if cfg.stage == 1:
        if isinstance(cfg, FinetuneConfig):
            # retrieval fine-tuning: captions of one image are never negatives of each other, and the ViT
            # trains, so ITM's negative images are gathered with gradient (as LAVIS's retrieval fine-tune)
            image_ids = device_tensors(batch, engine.device)["image_ids"]  # computed in prepare_batch
            return engine(pixels, ids, mask, rank=rank, gather=all_gather_no_grad,
                          gather_with_grad=all_gather_with_grad, image_ids=image_ids)
        return engine(pixels, ids, mask, rank=rank, gather=all_gather_no_grad)  # nothing is gathered with gradient
    if "llm_prompt_length" in batch:  # VQA rows: loss on the answer, the question also read by the Q-Former
        moved = device_tensors(batch, engine.device)
        return engine(pixels, ids, mask, prompt_lengths=moved["llm_prompt_length"],
                      question_ids=moved["qformer_input_ids"], question_mask=moved["qformer_attention_mask"])
    return engine(pixels, ids, mask)


def micro_step(engine, cfg: PretrainConfig, batch: dict, rank: int, step: int) -> StepOutput:
    """One micro batch through forward, backward and the engine's step (the first one compiles the model's
    regions first, with train.compile); each phase's end is a trace point (metrics.trace_step)."""
    warm_up(engine, cfg, lambda: forward(engine, cfg, batch, rank), rank)
    out = forward(engine, cfg, batch, rank)
    trace_step(f"step {step} forward")
    engine.backward(out["loss"])
    trace_step(f"step {step} backward")
    engine.step()
    trace_step(f"step {step} step")
    return out


class StepOutput(dict):
    """The model's output as a dict of tensors: "loss" and each "loss_*" component."""

    def components(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in self.items() if k.startswith("loss")}


def outputs_as_dicts(model: torch.nn.Module) -> None:
    """Make `model(...)` return a StepOutput instead of the Stage1Output/Stage2Output dataclass.

    ZeRO-3 re-gathers a module's own parameters before its backward through hooks on the module's
    output tensors, and it only finds tensors in tuples, lists and dicts: with a dataclass output the
    top module's parameters (queries, temperature) are missing in backward. Registered before
    deepspeed.initialize, this hook runs before DeepSpeed's.
    """

    def to_dict(module, inputs, out):
        d = StepOutput((k, v) for k, v in vars(out).items() if k.startswith("loss"))
        if len(d) == 1:  # stage 2: one loss, reported as the language-modelling component too
            d["loss_lm"] = d["loss"]
        return d

    model.register_forward_hook(to_dict)


def checkpoint_position(trained: TrainedRecords, position: DataPosition | None, plan, rank: int,
                        world: int) -> DataPosition | None:
    """Every rank's trained records since the last checkpoint folded into rank 0's position (all ranks call)."""
    import ray
    import torch.distributed as dist

    mine = trained.take()
    per_rank = [mine]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
    if rank != 0:
        return None
    epoch = max(e for e, _ in per_rank)
    position, warnings = merge_position(position, per_rank, ray.get(plan.good_records.remote(epoch)))
    for w in warnings:
        print(f"[data] warning: {w}", flush=True)
    return position


# -------------------------------------------------------------------------------------- checkpoints
def save_and_report(engine, metrics: dict, state: dict, rank: int, with_checkpoint: bool) -> None:
    """`ray.train.report` on every rank (it is a barrier); with a checkpoint, each rank adds its own files.

    DeepSpeed names its per-rank files by rank (zero_pp_rank_R_...), so the merged Ray checkpoint
    holds every shard; the frozen ViT/LLM are left out (rebuilt from the config on resume).
    """
    import ray.train

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    d = tempfile.mkdtemp(prefix=f"blip2_ckpt_r{rank}_")
    try:
        engine.save_checkpoint(d, tag=DS_TAG, exclude_frozen_parameters=True)
        if rank == 0:
            with open(os.path.join(d, STATE_FILE), "w") as f:
                json.dump(state, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                         checkpoint_dir_name=f"checkpoint_{state['step']:08d}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def restore(engine, cfg: PretrainConfig, world: int) -> dict | None:
    """Load the latest Ray checkpoint into the engine (model, optimizer, scheduler); its train state."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        with open(os.path.join(d, STATE_FILE)) as f:
            state = json.load(f)
        if state["world_size"] != world or state["zero_stage"] != cfg.deepspeed.zero_stage:
            raise RuntimeError(
                f"checkpoint of run {cfg.run_name!r} was written by {state['world_size']} workers with ZeRO-"
                f"{state['zero_stage']}; resume with the same scaling.num_workers and deepspeed.zero_stage "
                f"or choose a new run_name (start from the exported model instead)")
        engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False)
    return state


# ------------------------------------------------------------------------------------------ export
def export_model(engine, cfg: PretrainConfig, rank: int) -> str | None:
    """World-size-free HF export of the trained weights to cfg.output_dir (rank 0 writes; all ranks call).

    No rank builds another model: every tensor of the engine's module (ZeRO-3: each parameter gathered
    alone, the frozen ViT / LLM too) is streamed into safetensors shards by rank 0
    (model/hf_export_stream.py), so the export adds at most one shard to a worker's memory.
    """
    import torch.distributed as dist

    from blip2_ray.model.hf_export_stream import export_streamed
    from blip2_ray.model.tokenizer_paths import llm_tokenizer, qformer_tokenizer
    from blip2_ray.train.zero3 import gathered_state

    tokenizer = question_tokenizer = None
    if rank == 0:
        tokenizer = qformer_tokenizer(cfg.model) if cfg.stage == 1 else llm_tokenizer(cfg.model)
        if cfg.stage == 2 and engine.module.takes_question:  # VQA: InstructBlipProcessor keeps both tokenizers
            from blip2_ray.model.tokenizers import load_qformer_tokenizer
            from blip2_ray.train.finetune_model import question_tokenizer_dir

            question_tokenizer = load_qformer_tokenizer(question_tokenizer_dir(cfg))
    out = export_streamed(engine.module, cfg.stage, gathered_state(engine.module, rank),
                          cfg.output_dir if rank == 0 else None, tokenizer, cfg.model,
                          qformer_tokenizer=question_tokenizer)
    if out is not None:
        print(f"[stage{cfg.stage}] exported to {out}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return out


# -------------------------------------------------------------------------------------- the worker
def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(FinetuneConfig if config.get("finetune") else PretrainConfig, config["cfg"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    import ray.train
    import torch.distributed as dist

    from blip2_ray.data.epoch_plan import epoch_plan, epoch_plan_name

    trace_memory("worker start")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    engine = build_engine(cfg)
    try:
        plan = epoch_plan(epoch_plan_name(cfg.run_name))
    except ValueError:
        raise RuntimeError(f"no EpochPlan actor for run {cfg.run_name!r}: build the training dataset with "
                           f"train.trainer.build_train_dataset(cfg)") from None

    state = restore(engine, cfg, world) or {"step": 0, "epoch": 0, "start_steps": []}
    step = state["step"]
    start_step = step
    state["start_steps"] = state["start_steps"] + [step]
    state.update(world_size=world, zero_stage=cfg.deepspeed.zero_stage, stage=cfg.stage)
    position = DataPosition.from_state(state["data"]) if "data" in state else DataPosition(state["epoch"])
    torch.manual_seed(cfg.train.seed + 1000 * rank + step)  # dropout and negative draws differ per rank
    if rank == 0:
        resume = ""
        if step:
            resume = (f"resuming at step {step} in epoch {position.epoch} ({len(position.consumed)} shard visits "
                      f"consumed, {len(position.partial)} partly: {position.records_skipped()} records skipped)")
        print(f"[stage{cfg.stage}] run {cfg.run_name}: {resume or 'starting'} of {cfg.train.max_steps} steps, "
              f"{world} workers, ZeRO-{cfg.deepspeed.zero_stage}, precision {cfg.train.precision}, "
              f"grad accumulation {cfg.gradient_accumulation_steps}", flush=True)
    writer = tensorboard(cfg) if rank == 0 else None

    engine.train()
    shard = ray.train.get_dataset_shard("train")
    pin = engine.device.type == "cuda"
    epoch = position.epoch

    def stalled(waited_s: float) -> Exception:
        return DataStallError(stall_message(cfg, waited_s, rank, step, epoch))

    # each batch is prepared (pinned, copied to the device, normalised) in the feed's thread during the step before
    batches = BatchFeed(on_device(epoch_batches(cfg, shard, plan, rank, position, pin_memory=pin), cfg, engine.device),
                        cfg.data.stall_timeout_s, stalled)
    trained = TrainedRecords(position.epoch)
    fi = cfg.fault_injection
    window = LossWindow()
    try:
        while step < cfg.train.max_steps:
            if fi.pid_dir and rank == world - 1 and step + 1 == fi.at_step:
                _write_pid_once(fi.pid_dir, fi.pause_s)
            t0 = time.perf_counter()
            for _ in range(cfg.gradient_accumulation_steps):
                tw = time.perf_counter()
                epoch, batch = next(batches)
                window.wait += time.perf_counter() - tw
                trace_step(f"step {step + 1} data")
                out = micro_step(engine, cfg, batch, rank, step + 1)
                window.add(out)
                trained.add(epoch, batch["visit"], batch["record"])
                trace_step(f"step {step + 1} metrics")
                if fi.trained_keys_dir:
                    _write_trained_keys(fi.trained_keys_dir, rank, start_step, step + 1, epoch, batch)
            step += 1
            window.time += time.perf_counter() - t0
            window.steps += 1
            last = step == cfg.train.max_steps
            checkpoint = last or step % cfg.train.checkpoint_every == 0
            if not (checkpoint or step % cfg.train.log_every == 0):
                continue
            metrics = window.metrics(cfg, engine, step, epoch)
            metrics["start_steps"] = list(state["start_steps"])
            if rank == 0:
                log_step(cfg, writer, metrics)
            if checkpoint:
                position = checkpoint_position(trained, position, plan, rank, world)
                state.update(step=step, epoch=epoch, data=position.to_state() if position else None)
            save_and_report(engine, metrics, state, rank, with_checkpoint=checkpoint)
            trace_step(f"step {step} report")
            window = LossWindow()
    finally:
        batches.close()  # stop this worker's data stream before the export

    if state["start_steps"][-1] >= cfg.train.max_steps and rank == 0:
        print(f"[stage{cfg.stage}] run {cfg.run_name} had already reached step {step}; exporting only", flush=True)
    trace_memory("before export")
    export_model(engine, cfg, rank)
    trace_memory("exported")
    if writer is not None:
        writer.close()
    if dist.is_initialized():
        dist.barrier()


def vectorise_scalar_parameters(model: torch.nn.Module) -> list[str]:
    """Make every 0-dim parameter (the ITC temperature) a 1-element vector, in place; their names.

    DeepSpeed 0.19 broadcasts and partitions parameters through `p.data.view(torch.uint8)`, which
    raises for a 0-dim tensor. A (1,) tensor broadcasts the same in the model's arithmetic; the
    export reshapes it back (`export_model`).
    """
    names = []
    for name, p in list(model.named_parameters()):
        if p.dim() == 0:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, leaf, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
            names.append(name)
    return names


def _write_trained_keys(directory: str, rank: int, start_step: int, step: int, epoch: int, batch: dict) -> None:
    """Test hook: one line per trained row, "<run start step> <step> <epoch> <key> <crc32 of its uint8 pixels>"."""
    os.makedirs(directory, exist_ok=True)
    pixels = batch["pixel_values"].cpu().numpy()
    with open(os.path.join(directory, f"rank{rank}.txt"), "a") as f:
        for i, key in enumerate(batch["key"]):
            f.write(f"{start_step} {step} {epoch} {key} {zlib.crc32(pixels[i].tobytes())}\n")


def _write_pid_once(pid_dir: str, pause_s: float) -> None:
    path = os.path.join(pid_dir, "worker.pid")
    if os.path.exists(path):
        return
    os.makedirs(pid_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(pause_s)
