"""What a checkpoint records of the data (train/data_position.py) and the per-window loss sums, no Ray."""

from __future__ import annotations

import json

import numpy as np
import torch

from blip2_ray.data.epoch_plan import count_records, pack_records, union_records, unpack_records
from blip2_ray.train.data_position import DataPosition, TrainedRecords, merge_position


def numbers(bitmap: bytes) -> list[int]:
    return np.flatnonzero(unpack_records(bitmap)).tolist()


def test_record_bitmaps():
    assert pack_records([]) == b"" and numbers(b"") == []
    bits = pack_records([0, 3, 9])
    assert numbers(bits) == [0, 3, 9] and count_records(bits) == 3
    assert numbers(union_records(bits, pack_records([1, 20]))) == [0, 1, 3, 9, 20]
    assert numbers(union_records(pack_records([1]), bits)) == [0, 1, 3, 9]


def test_ranks_trained_records_fold_into_consumed_and_partial_visits():
    r0, r1 = TrainedRecords(0), TrainedRecords(0)
    r0.add(0, np.array([5, 5, 2]), np.array([0, 1, 0]))
    r1.add(0, np.array([5, 2]), np.array([2, 3]))
    good = {5: 3, 2: 4}  # visit 5 holds 3 good records (all trained now), visit 2 holds 4 (2 trained)
    pos, warnings = merge_position(DataPosition(0), [r0.take(), r1.take()], good)
    assert warnings == [] and pos.consumed == {5} and numbers(pos.partial[2]) == [0, 3]
    assert r0.take() == (0, {})  # taken: rank 0 holds them in the position now
    # the next checkpoint completes visit 2; an unknown good count (its decode task not done) stays partial
    r1.add(0, np.array([2, 2, 7]), np.array([1, 2, 0]))
    pos, _ = merge_position(pos, [r0.take(), r1.take()], good)
    assert pos.consumed == {2, 5} and set(pos.partial) == {7}
    # the checkpoint state is JSON and round-trips
    again = DataPosition.from_state(json.loads(json.dumps(pos.to_state())))
    assert again == pos and again.records_skipped() == 1


def test_a_new_epoch_starts_a_new_position():
    r0 = TrainedRecords(0)
    r0.add(0, np.array([1]), np.array([0]))
    r0.add(1, np.array([4]), np.array([2]))  # the rank moved on: epoch 0's rows are forgotten
    pos, _ = merge_position(DataPosition(0, {1, 2}, {3: pack_records([0])}), [r0.take()], {})
    assert pos.epoch == 1 and pos.consumed == set() and numbers(pos.partial[4]) == [2]
    # ranks in different epochs (should not happen with equal splits): the later epoch wins, with a warning
    a, b = TrainedRecords(1), TrainedRecords(2)
    a.add(1, np.array([0]), np.array([0]))
    b.add(2, np.array([3]), np.array([1]))
    pos, warnings = merge_position(pos, [a.take(), b.take()], {})
    assert pos.epoch == 2 and set(pos.partial) == {3} and "different epochs" in warnings[0]


class _Engine:
    device = torch.device("cpu")
    module = torch.nn.Linear(2, 2)

    def get_lr(self):
        return [1e-4]


def test_loss_window_keeps_device_tensors_until_the_report():
    from blip2_ray.config import from_dict
    from blip2_ray.train.config import PretrainConfig
    from blip2_ray.train.metrics import LossWindow

    cfg = from_dict(PretrainConfig, {"data": {"image_size": 32}, "scaling": {"num_workers": 2},
                                     "train": {"global_batch_size": 8, "micro_batch_size": 4}})
    w = LossWindow()
    for v in (1.0, 3.0):
        w.add({"loss": torch.tensor(v, requires_grad=True) * 2, "loss_itc": torch.tensor(v), "logits": torch.ones(3)})
    assert set(w.sums) == {"loss", "loss_itc"} and all(isinstance(t, torch.Tensor) for t in w.sums.values())
    assert not any(t.requires_grad for t in w.sums.values())
    w.steps, w.time, w.wait = 2, 4.0, 1.0
    m = w.metrics(cfg, _Engine(), step=2, epoch=0)
    assert m["loss"] == 4.0 and m["loss_itc"] == 2.0 and m["samples_per_s"] == 4.0 and m["data_wait_fraction"] == 0.25
    assert m["peak_host_rss_gib"] > 0 and m["frozen_param_fraction_held"] == 0.0  # no frozen parameters here
    assert "peak_device_memory_gib" not in m  # CPU


def test_the_epoch_plan_actor_module_does_not_import_ray_data():
    """The EpochPlan actor's process imports its module only: without Ray Data (2.2 CPU s per run, 2-core machine)."""
    import subprocess
    import sys

    code = "import sys, blip2_ray.data.epoch_plan; print('ray.data' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.split() == ["False"], done.stdout + done.stderr[-1000:]
