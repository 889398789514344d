"""A Train worker's checkpoints: DeepSpeed's per-rank files plus the run's train state, through `ray.train.report`.

    checkpoint_position  every rank's trained records folded into the data position a checkpoint records
    save_and_report      `ray.train.report` on every rank, each adding its own files to the checkpoint
    restore              the latest checkpoint into the engine; its train state (step, epoch, data position)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from blip2_ray.train.config import PretrainConfig
from blip2_ray.train.data_position import DataPosition, TrainedRecords, merge_position

STATE_FILE = "train_state.json"
DS_TAG = "ds"  # DeepSpeed checkpoint tag inside every Ray checkpoint directory


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
