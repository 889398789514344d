"""The Ray Train worker: DeepSpeed ZeRO on the Q-Former, checkpoints through `ray.train.report`, export.

One function, `train_loop_per_worker(config)`, runs on every worker. `config["cfg"]` is the job's
`to_dict(PretrainConfig)` (or of a subclass, named by `config["config_class"]`); the worker rebuilds and
re-validates it. The config's task (train/tasks: pre-training stage 1 / 2, caption, retrieval, VQA fine-tuning)
builds the model, runs the forward of a micro batch and names what the export saves; the loop knows no task.
Per optimizer step: `grad_accum` micro batches from this worker's dataset shard (train/batches.py) -> the task's
forward under autocast -> engine.backward -> engine.step. Test hooks (train/fault_injection.py) come from the
config's fault_injection section.

Data position on resume (train/data_position.py): every row carries its shard visit and record number;
each checkpoint records the epoch, the visits trained to their end and a bitmap of the trained records of
the others. A resumed run (a resubmitted job, or the worker group restarted after a crash) hands that to
the run's EpochPlan, which leaves the consumed visits out of the epoch and has the decode tasks skip the
trained records of the partial ones: within an epoch no record is trained twice across a resume and none
is lost (rows still in a shuffle buffer at the checkpoint come again); the resume decodes only what it
has not trained.
"""

from __future__ import annotations

import os
import time

import torch

from blip2_ray.config import from_dict
from blip2_ray.train.batches import BatchFeed, DataStallError, epoch_batches, on_device, stall_message
from blip2_ray.train.checkpoints import checkpoint_position, restore, save_and_report
from blip2_ray.train.compile_step import compile_for_training, warm_up
from blip2_ray.train.config import PretrainConfig
from blip2_ray.train.data_position import DataPosition, TrainedRecords
from blip2_ray.train.distributed import without_deepspeed_shm_kernel
from blip2_ray.train.export import export_model
from blip2_ray.train.fault_injection import step_hooks
from blip2_ray.train.metrics import LossWindow, log_step, tensorboard, trace_memory, trace_step
from blip2_ray.train.optim import deepspeed_config, param_groups, warmup_cosine
from blip2_ray.train.tasks import task_of


# ----------------------------------------------------------------------------------- model pieces
def build_model(cfg: PretrainConfig) -> torch.nn.Module:
    """The task's model (train/tasks), seeded: random frozen parts are identical on every rank and every restart.

    ZeRO-3 (the process group must exist): the frozen ViT / LLM are built partitioned over the ranks
    (train/zero3.py), never whole on one worker; weight files are read into each rank's slices.
    """
    construction = None
    if cfg.deepspeed.zero_stage == 3:
        from blip2_ray.train.zero3 import frozen_construction, gloo_collectives_in_place

        gloo_collectives_in_place()
        construction = frozen_construction(deepspeed_config(cfg))
    trace_memory("construction")
    torch.manual_seed(cfg.train.seed)
    return task_of(cfg).build_model(cfg, construction)


def build_engine(cfg: PretrainConfig):
    """The seeded model inside a DeepSpeed engine (the process group of this worker must exist).

    Precision (docs/training.md): the engine runs its forward under torch.autocast (train.precision) and
    casts no parameter: trainable ones stay float32 (the master weights), the frozen ViT/LLM keep the dtype
    they are stored in.
    """
    import deepspeed

    without_deepspeed_shm_kernel()
    model = build_model(cfg)
    trace_memory("built")
    lr_scale = task_of(cfg).lr_scale(model, cfg)
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


def micro_step(engine, cfg: PretrainConfig, batch: dict, rank: int, step: int) -> StepOutput:
    """One micro batch through the config's task's forward, backward and the engine's step (the first one compiles
    the model's regions first, with train.compile); each phase's end is a trace point (metrics.trace_step)."""
    task = task_of(cfg)
    warm_up(engine, cfg, lambda: task.forward(engine, batch, rank), rank)
    out = task.forward(engine, batch, rank)
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


# ------------------------------------------------------------------------------------------ export
# -------------------------------------------------------------------------------------- the worker
def train_loop_per_worker(config: dict) -> None:
    """`config`: {"cfg": to_dict(job config), "config_class": its class (default PretrainConfig)}; the config's
    task (train/tasks) decides the model, the step's inputs and the export."""
    cfg = from_dict(config.get("config_class", PretrainConfig), config["cfg"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    import ray.train

    from blip2_ray.runtime.heartbeat import Heartbeat

    quiet_report_lines()

    # rank 0 says what it is doing when it has said nothing for 25 s (model build, first batch, export)
    with Heartbeat(f"[stage{cfg.stage}] ", enabled=ray.train.get_context().get_world_rank() == 0) as beat:
        _train(cfg, beat)


def quiet_report_lines() -> None:
    """Ray Train logs every report's whole metrics dict ("Reporting training result N: TrainingReport(...)") at
    INFO on a logger named by its file path, so RunConfig's log level (trainer.run_config) misses it: WARNING here.
    The progress line of each logging window says what matters."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _train(cfg: PretrainConfig, beat) -> None:
    import ray.train
    import torch.distributed as dist

    from blip2_ray.data.epoch_plan import epoch_plan, epoch_plan_name

    task = task_of(cfg)
    trace_memory("worker start")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    beat.phase("building the model")
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
        beat.said()
    writer = tensorboard(cfg) if rank == 0 else None

    engine.train()
    shard = ray.train.get_dataset_shard("train")
    pin = engine.device.type == "cuda"
    epoch = position.epoch

    def stalled(waited_s: float) -> Exception:
        return DataStallError(stall_message(cfg, waited_s, rank, step, epoch))

    # each batch is prepared (pinned, copied to the device, normalised) in the feed's thread during the step before
    feed = on_device(epoch_batches(cfg, shard, plan, rank, position, pin_memory=pin), cfg, engine.device,
                     lambda b: task.host_tensors(b, cfg))
    batches = BatchFeed(feed, cfg.data.stall_timeout_s, stalled)
    trained = TrainedRecords(position.epoch)
    hooks = step_hooks(cfg, rank, world, start_step)
    beat.phase(f"waiting for the first batch of step {step + 1}")
    window = LossWindow()
    try:
        while step < cfg.train.max_steps:
            hooks.before_step(step)
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
                hooks.after_micro_batch(step + 1, epoch, batch)
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
                beat.said()
                beat.phase(f"training step {step + 1}")
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
    beat.phase(f"exporting the model to {cfg.output_dir}")
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

