"""The Ray Train worker: DeepSpeed ZeRO on the Q-Former, checkpoints through `ray.train.report`, export.

One function, `train_loop_per_worker(config)`, runs on every worker. `config["cfg"]` is the job's
`to_dict(PretrainConfig)`; the worker rebuilds and re-validates it. Per optimizer step: `grad_accum`
micro batches from this worker's dataset shard -> forward -> engine.backward -> engine.step.

Data position on resume: the checkpoint records (epoch, micro batches consumed in that epoch); a
resumed run starts that epoch again and discards the consumed batches before training (each rank
the same number), so a restart sees the rest of the epoch, not its beginning again. The streaming
split of Ray Data is not deterministic, so "the rest" is the right *number* of rows, not
guaranteed to be the identical rows.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Iterator

import torch

from blip2_ray.config import from_dict
from blip2_ray.train.config import PretrainConfig
from blip2_ray.train.distributed import all_gather_no_grad, all_gather_with_grad
from blip2_ray.train.optim import deepspeed_config, param_groups, warmup_cosine

STATE_FILE = "train_state.json"
DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every Ray checkpoint directory


# ----------------------------------------------------------------------------------- model pieces
def build_model(cfg: PretrainConfig) -> torch.nn.Module:
    """The stage's model, seeded: random frozen parts are identical on every rank and every restart."""
    from blip2_ray.model.builders import build_stage1, build_stage2

    torch.manual_seed(cfg.train.seed)
    return build_stage1(cfg.model) if cfg.stage == 1 else build_stage2(cfg.model)


def forward(engine, cfg: PretrainConfig, batch: dict, rank: int):
    """One micro batch through the engine -> Stage1Output / Stage2Output."""
    dev = engine.device
    if cfg.stage == 1:
        return engine(batch["pixel_values"].to(dev), batch["qformer_input_ids"].to(dev),
                      batch["qformer_attention_mask"].to(dev), rank=rank,
                      gather=all_gather_no_grad, gather_with_grad=all_gather_with_grad)
    return engine(batch["pixel_values"].to(dev), batch["llm_input_ids"].to(dev), batch["llm_attention_mask"].to(dev))


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


def frozen_fraction_held(module: torch.nn.Module) -> float:
    """Elements of the frozen parameters this rank holds / their full size (ZeRO-3: about 1/world)."""
    held = total = 0
    for p in module.parameters():
        if p.requires_grad:
            continue
        full = int(getattr(p, "ds_numel", p.numel()))
        total += full
        if hasattr(p, "ds_tensor") and p.data.numel() == 0:
            held += p.ds_tensor.numel()  # partitioned: only this rank's slice is resident
        else:
            held += p.data.numel()  # whole (ZeRO-2, or under the persistence threshold)
    return held / max(total, 1)


# ------------------------------------------------------------------------------------------- data
def micro_batches(cfg: PretrainConfig, epoch: int, skip: int) -> Iterator[tuple[int, int, dict]]:
    """(epoch, batches consumed in that epoch, batch) forever, starting at `epoch` after `skip` batches."""
    import ray.train

    from blip2_ray.data.pipeline import iter_train_batches

    while True:
        shard = ray.train.get_dataset_shard("train")
        n = 0
        for batch in iter_train_batches(shard, cfg.train.micro_batch_size, cfg.data, epoch=epoch):
            n += 1
            if n <= skip:
                continue
            yield epoch, n, batch
        if n == 0:
            raise RuntimeError("the training data gave this worker no full micro batch; add data or lower "
                               "train.micro_batch_size")
        epoch, skip = epoch + 1, 0


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
    """World-size-free HF export of the trained weights to cfg.output_dir (rank 0 writes; all ranks call)."""
    import deepspeed
    import torch.distributed as dist

    from blip2_ray.model.hf_format import export_stage1, export_stage2
    from blip2_ray.model.tokenizer_paths import llm_tokenizer, qformer_tokenizer

    trainable = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    state = None
    if cfg.deepspeed.zero_stage == 3:
        with deepspeed.zero.GatheredParameters([p for _, p in trainable], modifier_rank=None):
            if rank == 0:
                state = {n: p.detach().float().cpu().clone() for n, p in trainable}
    elif rank == 0:
        state = {n: p.detach().float().cpu().clone() for n, p in trainable}
    out = None
    if rank == 0:
        # a fresh plain model: frozen parts in their configured dtype (DeepSpeed may have cast them)
        plain = build_model(cfg)
        shapes = {n: p.shape for n, p in plain.named_parameters() if p.requires_grad}
        missing = set(shapes) - set(state)
        if missing:
            raise RuntimeError(f"trained state lacks {sorted(missing)[:3]}")
        # reshape undoes vectorise_scalar_parameters
        plain.load_state_dict({n: state[n].reshape(shapes[n]) for n in shapes}, strict=False)
        if cfg.stage == 1:
            out = export_stage1(plain, cfg.output_dir, qformer_tokenizer(cfg.model), cfg.model)
        else:
            out = export_stage2(plain, cfg.output_dir, llm_tokenizer(cfg.model), cfg.model)
        print(f"[stage{cfg.stage}] exported to {out}", flush=True)
    if dist.is_initialized():
        dist.barrier()
    return out


# -------------------------------------------------------------------------------------- the worker
def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(PretrainConfig, config["cfg"])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
    import deepspeed  # inside the worker: the driver may have no accelerator
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = build_model(cfg)
    sched = warmup_cosine(cfg.train.max_steps, cfg.train.warmup_steps, cfg.train.lr, cfg.min_lr,
                          cfg.train.warmup_start_lr)
    vectorise_scalar_parameters(model)
    outputs_as_dicts(model)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched),
        dist_init_required=False,
    )
    frozen_held = frozen_fraction_held(engine.module)

    state = restore(engine, cfg, world) or {"step": 0, "epoch": 0, "batches_in_epoch": 0, "start_steps": []}
    step = state["step"]
    state["start_steps"] = state["start_steps"] + [step]
    state.update(world_size=world, zero_stage=cfg.deepspeed.zero_stage, stage=cfg.stage)
    torch.manual_seed(cfg.train.seed + 1000 * rank + step)  # dropout and negative draws differ per rank
    if rank == 0:
        print(f"[stage{cfg.stage}] run {cfg.run_name}: {'resuming at step ' + str(step) if step else 'starting'} "
              f"of {cfg.train.max_steps}, {world} workers, ZeRO-{cfg.deepspeed.zero_stage}, "
              f"grad accumulation {cfg.gradient_accumulation_steps}", flush=True)
    writer = _tensorboard(cfg) if rank == 0 else None

    engine.train()
    batches = micro_batches(cfg, state["epoch"], state["batches_in_epoch"])
    fi = cfg.fault_injection
    window = _Window()
    while step < cfg.train.max_steps:
        if fi.pid_dir and rank == world - 1 and step + 1 == fi.at_step:
            _write_pid_once(fi.pid_dir, fi.pause_s)
        t0 = time.perf_counter()
        for _ in range(cfg.gradient_accumulation_steps):
            tw = time.perf_counter()
            epoch, consumed, batch = next(batches)
            window.wait += time.perf_counter() - tw
            out = forward(engine, cfg, batch, rank)
            engine.backward(out["loss"])
            engine.step()
            window.add(out.components())
        step += 1
        window.time += time.perf_counter() - t0
        window.steps += 1
        state.update(step=step, epoch=epoch, batches_in_epoch=consumed)
        last = step == cfg.train.max_steps
        checkpoint = last or step % cfg.train.checkpoint_every == 0
        if not (checkpoint or step % cfg.train.log_every == 0):
            continue
        metrics = window.metrics(cfg, engine, step, epoch)
        metrics["frozen_param_fraction_held"] = frozen_held
        metrics["start_steps"] = list(state["start_steps"])
        if rank == 0:
            _log(cfg, writer, metrics)
        save_and_report(engine, metrics, state, rank, with_checkpoint=checkpoint)
        window = _Window()
    del batches  # stop this worker's data stream before the export

    if state["start_steps"][-1] >= cfg.train.max_steps and rank == 0:
        print(f"[stage{cfg.stage}] run {cfg.run_name} had already reached step {step}; exporting only", flush=True)
    export_model(engine, cfg, rank)
    if writer is not None:
        writer.close()
    if dist.is_initialized():
        dist.barrier()


def vectorise_scalar_parameters(model: torch.nn.Module) -> list[str]:
    """Make every 0-dim parameter (the ITC temperature) a 1-element vector, in place; their names.

    DeepSpeed 0.19 broadcasts and partitions parameters through `p.data.view(torch.uint8)`, which
    raises for a 0-dim tensor. A (1,) tensor broadcasts the same in the model's arithmetic; the
    export reshapes it back (`plain_state`).
    """
    names = []
    for name, p in list(model.named_parameters()):
        if p.dim() == 0:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(owner, leaf, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
            names.append(name)
    return names


class _Window:
    """Sums over the steps since the last report."""

    def __init__(self):
        self.steps, self.time, self.wait, self.n = 0, 0.0, 0.0, 0
        self.sums: dict[str, float] = {}

    def add(self, comps: dict[str, float]) -> None:
        self.n += 1
        for k, v in comps.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def metrics(self, cfg: PretrainConfig, engine, step: int, epoch: int) -> dict:
        import torch.distributed as dist

        keys = sorted(self.sums)
        # loss components averaged over ranks and micro batches (the progress line shows the global view)
        vec = torch.tensor([self.sums[k] / max(self.n, 1) for k in keys] + [self.wait, self.time], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(vec)
            vec /= dist.get_world_size()
        out = {k: float(v) for k, v in zip(keys, vec[: len(keys)])}
        wait, elapsed = float(vec[-2]), max(float(vec[-1]), 1e-9)
        out.update(
            step=step, epoch=epoch, lr=float(engine.get_lr()[0]),
            samples_per_s=cfg.train.global_batch_size * self.steps / elapsed,
            steps_per_s=self.steps / elapsed,
            data_wait_fraction=wait / elapsed,
            skipped_records=_skipped(),
        )
        return out


def _skipped() -> int:
    try:
        from blip2_ray.data.pipeline import get_skip_counts

        return int(sum(get_skip_counts("train").values()))
    except Exception:
        return -1


def _tensorboard(cfg: PretrainConfig):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    os.makedirs(cfg.tensorboard_path, exist_ok=True)
    return SummaryWriter(cfg.tensorboard_path)


def _log(cfg: PretrainConfig, writer, m: dict) -> None:
    losses = " ".join(f"{k.removeprefix('loss_')} {m[k]:.3f}" for k in sorted(m) if k.startswith("loss_"))
    print(f"[stage{cfg.stage}] step {m['step']}/{cfg.train.max_steps} loss {m['loss']:.4f} ({losses}) "
          f"lr {m['lr']:.2e} {m['samples_per_s']:.1f} samples/s data-wait {100 * m['data_wait_fraction']:.0f}% "
          f"skipped {m['skipped_records']}", flush=True)
    if writer is not None:
        for k, v in m.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(f"train/{k}", v, m["step"])
        writer.flush()


def _write_pid_once(pid_dir: str, pause_s: float) -> None:
    path = os.path.join(pid_dir, "worker.pid")
    if os.path.exists(path):
        return
    os.makedirs(pid_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(pause_s)
