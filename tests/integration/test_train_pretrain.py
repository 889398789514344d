"""Pre-training on Ray Train + DeepSpeed with 2 CPU workers (gloo) on generated shapes shards.

Few, combined trainer runs (the whole file is minutes on 2 cores):
  1. stage 1, ZeRO-3, bf16 autocast with a bfloat16 ViT (mixed dtypes, 2 ranks), train.compile (aot_eager: the
     compiled blocks are ZeRO-3 leaves): checkpoints, frozen ViT held ~1/2 per worker, export loads in HF. (A
     worker group lost mid-run and restarted from its last checkpoint, every record still trained exactly
     once: test_multinode, which removes a node with a worker on it.)
  2. the same run resubmitted with a larger max_steps continues from its checkpoint, into epoch 1: across the
     resume every record of epoch 0 is trained exactly once, the resubmission decodes only epoch 0's
     untrained records, and every trained row has the crop/flip of its own epoch (epoch 1 differs).
  3. stage 2, ZeRO-2, Q-Former from the stage-1 export: finite loss, checkpoint, HF export + processor.
  4. a run whose decode tasks cannot start stops after data.stall_timeout_s with the diagnosis.
"""

from __future__ import annotations

import math
import os
import time
import zlib

import pytest
from trained_rows import surviving_rows

from blip2_ray.config import load_config
from blip2_ray.train.config import PretrainConfig


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from blip2_ray.fixtures.sample import make_sample_shards

    d = tmp_path_factory.mktemp("shapes")
    make_sample_shards(str(d), num=64, shards=4, image_size=32, seed=0)
    return str(d)


def tiny_cfg(tmp, shards, **sets) -> PretrainConfig:
    base = {
        "data.train": f"[{shards}]", "data.image_size": 32, "data.shuffle_buffer": 16,
        "data.num_cpus_per_decode_task": 0.5, "data.decode_concurrency": 2, "data.decode_batch_size": 16,
        "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.precision": "fp32",
        "train.log_every": 1, "train.checkpoint_every": 2, "train.warmup_steps": 2,
        "scaling.num_workers": 2, "storage_path": f"{tmp}/runs", "failure.max_failures": 2,
    }
    base.update({k: v for k, v in sets.items()})
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in base.items()])


@pytest.fixture(scope="module")
def stage1_run(ray_session, shards, tmp_path_factory):
    """Stage 1 ZeRO-3, 4 steps, checkpoint every 2, every trained row recorded."""
    from blip2_ray.train.trainer import run_pretrain

    tmp = tmp_path_factory.mktemp("stage1")
    cfg = tiny_cfg(tmp, shards, **{
        "stage": 1, "run_name": "s1", "output_dir": f"{tmp}/export", "train.max_steps": 4,
        "deepspeed.zero_stage": 3, "deepspeed.stage3_param_persistence_threshold": 0,
        "train.precision": "bf16", "model.vision.dtype": "bfloat16",
        "train.compile": True, "train.compile_backend": "aot_eager",  # compiled blocks as ZeRO-3 leaves
        "fault_injection.trained_keys_dir": str(tmp / "trained"),
    })
    return cfg, run_pretrain(cfg)


def test_stage1_zero3_bf16_trains_checkpoints_and_exports(stage1_run):
    from transformers import Blip2ForImageTextRetrieval

    from blip2_ray.train.trainer import read_train_state
    from blip2_ray.weights.hf_format import load_stage1

    cfg, result = stage1_run
    assert result.error is None
    m = result.metrics
    assert m["step"] == 4 and all(math.isfinite(m[k]) for k in ("loss", "loss_itc", "loss_itm", "loss_itg"))
    assert m["compile_mode"] == "run" and m["compile_s"] > 0  # compiled (train.compile), no fallback
    assert m["start_steps"] == [0]
    state = read_train_state(result.checkpoint)
    assert state["step"] == 4 and state["start_steps"] == [0] and state["world_size"] == 2
    run_dir = os.path.join(cfg.local_storage_path, "s1")
    ckpts = sorted(p for p in os.listdir(run_dir)
                   if p.startswith("checkpoint_0") and os.path.isdir(os.path.join(run_dir, p)))
    assert ckpts == ["checkpoint_00000002", "checkpoint_00000004"]
    # ZeRO-3: each of the 2 workers holds about half of the frozen ViT
    assert 0.45 <= m["frozen_param_fraction_held"] <= 0.55
    assert 0 <= m["data_wait_fraction"] <= 1 and m["samples_per_s"] > 0 and m["skipped_records"] == 0
    assert 0.1 < m["peak_host_rss_gib"] < 8
    hf = Blip2ForImageTextRetrieval.from_pretrained(cfg.output_dir)
    assert hf.config.num_query_tokens == 8
    model, _ = load_stage1(cfg.output_dir)
    assert model.temp.dim() == 0
    assert os.listdir(cfg.tensorboard_path)


def expected_pixel_crcs(shards: str, epoch: int, cfg: PretrainConfig) -> dict[str, int]:
    """key -> CRC of the uint8 crop + flip the recipe gives each record in `epoch` (computed here, no Ray)."""
    from blip2_ray.data.readers import read_shard_records
    from blip2_ray.data.records import record_rng
    from blip2_ray.data.sources import list_shards
    from blip2_ray.data.transforms import decode_image, train_crop

    out = {}
    for path in list_shards(shards):
        for r in read_shard_records(path, cfg.data.image_keys, cfg.data.caption_keys, lambda reason: None):
            rng = record_rng(cfg.data.seed, epoch, r["key"])  # one caption each: no draw before the crop
            im = decode_image(r["image"], cfg.data.min_image_side, cfg.data.max_image_pixels)
            out[r["key"]] = zlib.crc32(train_crop(im, cfg.data.image_size, rng, cfg.data.min_crop_scale).tobytes())
    return out


def test_resubmitted_run_continues_from_its_checkpoint_without_training_a_record_twice(stage1_run, shards,
                                                                                      monkeypatch):
    import ray

    from blip2_ray.data import epoch_plan as plans
    from blip2_ray.train.trainer import run_pretrain

    cfg, _ = stage1_run
    # the run's own epoch plan (a fresh one: the first run's ended with it), read as the run ends
    decoded, release = {}, plans.release_epoch_plan

    def read_then_release(name: str) -> None:
        decoded["epoch0"] = ray.get(plans.epoch_plan(name).decoded_records.remote(0))
        release(name)

    monkeypatch.setattr(plans, "release_epoch_plan", read_then_release)
    cfg.train.max_steps = 12  # 8 steps of 8 records are one epoch of the 64: this run ends 4 steps into epoch 1
    result = run_pretrain(cfg)
    assert result.metrics["step"] == 12 and result.metrics["start_steps"] == [0, 4] and result.metrics["epoch"] == 1
    # cheap resume: this run decoded only the 32 records of epoch 0 not trained before its step-4 checkpoint
    # (the decoding of the visits consumed before it and of the trained records of the partial ones is skipped)
    assert decoded["epoch0"] == 64 - 4 * 8

    rows = surviving_rows(cfg.fault_injection.trained_keys_dir)
    epoch0 = [k for e, k, _ in rows if e == 0]
    epoch1 = [k for e, k, _ in rows if e == 1]
    keys = sorted(expected_pixel_crcs(shards, 0, cfg))
    assert sorted(epoch0) == keys  # across the resubmission: each record exactly once
    assert len(epoch1) == 4 * 8 == len(set(epoch1))
    # every row has the crop and flip of its own epoch (so a resumed run continues the same sequence) ...
    want = {e: expected_pixel_crcs(shards, e, cfg) for e in (0, 1)}
    assert all(crc == want[e][k] for e, k, crc in rows)
    # ... and epoch 1 sees other crops and flips of the same images than epoch 0
    assert sum(want[0][k] != want[1][k] for k in epoch1) >= 0.9 * len(epoch1)


def test_stage2_zero2_from_stage1_export(stage1_run, shards, tmp_path):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from blip2_ray.train.trainer import read_train_state, run_pretrain

    s1_cfg, _ = stage1_run
    cfg = tiny_cfg(tmp_path, shards, **{
        "stage": 2, "run_name": "s2", "output_dir": f"{tmp_path}/export", "train.max_steps": 2,
        "deepspeed.zero_stage": 2, "model.init_from": s1_cfg.output_dir,
    })
    result = run_pretrain(cfg)
    m = result.metrics
    assert m["step"] == 2 and math.isfinite(m["loss"]) and math.isfinite(m["loss_lm"])
    assert m["frozen_param_fraction_held"] == 1.0  # ZeRO-2 keeps the frozen parts whole
    assert read_train_state(result.checkpoint)["step"] == 2
    hf = Blip2ForConditionalGeneration.from_pretrained(cfg.output_dir)
    processor = Blip2Processor.from_pretrained(cfg.output_dir)
    assert hf.config.num_query_tokens == 8 and processor.num_query_tokens == 8


def test_a_run_whose_data_cannot_flow_stops_with_a_diagnosis(ray_session, shards, tmp_path, monkeypatch, capfd):
    """The start-up check is bypassed (as if the CPUs were taken after it ran): the worker holds 3.5 of the
    4 CPUs, a decode task needs 1, no batch ever comes, and the run stops after data.stall_timeout_s.
    On this dashboard-less instance no placement-group cleaner runs (it warned each second of a run), and the run's
    epoch plan actor ends with the run."""
    from blip2_ray.train import resources
    from blip2_ray.train.batches import DataStallError
    from blip2_ray.train.trainer import run_pretrain

    monkeypatch.setattr(resources, "check_cluster", lambda cfg: None)
    cfg = tiny_cfg(tmp_path, shards, **{
        "stage": 1, "run_name": "stall", "output_dir": f"{tmp_path}/export", "train.max_steps": 2,
        "scaling.num_workers": 1, "scaling.cpus_per_worker": 3.5, "data.num_cpus_per_decode_task": 1.0,
        "data.stall_timeout_s": 10, "failure.max_failures": 0,
    })
    with pytest.raises(DataStallError) as e:  # raised at all: the run stopped (max_failures 0, no retry)
        run_pretrain(cfg)
    msg = str(e.value)
    # ... after the stall timeout, by its own clock (not timed here: a busy machine stretches the run's start)
    assert "received no batch for 10 s (data.stall_timeout_s=10) at step 0, epoch 0" in msg, msg
    assert "data.num_cpus_per_decode_task=1 CPU each" in msg and "cluster has CPU 3.5 of 4 used" in msg, msg
    assert "Failed to query Ray Train Controller" not in capfd.readouterr().err
    # the run's epoch plan ended with it (this driver goes on): its name is free again
    import ray

    from blip2_ray.data.epoch_plan import PLAN_NAMESPACE, epoch_plan_name

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            ray.get_actor(epoch_plan_name("stall"), namespace=PLAN_NAMESPACE)
        except ValueError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the run's EpochPlan actor outlived the run")
