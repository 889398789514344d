"""The shared runtime against a real Ray: user errors from actor pools, tasks and plain actors."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from blip2_ray.errors import UserError


@pytest.fixture(autouse=True, scope="module")
def _workers_unpickle_this_module():
    """The classes below reach Ray workers by value: the workers cannot import a test module."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


SENTENCE = "shard 'x.tar' lacks a caption column; set data.caption_keys"


class FailsOnRowThree:
    def __call__(self, batch):
        if 3 in batch["n"].tolist():
            raise UserError(SENTENCE)
        return {"n": batch["n"] * 2}


class FailsToStart:
    def __init__(self, reason: str):
        raise UserError(reason)

    def __call__(self, batch):
        return batch


class FailsWithABug:
    def __call__(self, batch):
        raise KeyError("not a user error")


def yields_then_fails(batch):
    yield {"n": batch["n"]}
    raise UserError(SENTENCE)


def _numbers(n: int = 8):
    import ray

    return ray.data.from_items([{"n": i} for i in range(n)], override_num_blocks=4)


def _consume(ds) -> list:
    return [b for b in ds.iter_batches(batch_size=None, batch_format="numpy")]


def test_user_error_of_an_actor_pool_call_reaches_the_driver_alone(ray_session):
    import ray

    from blip2_ray.runtime.user_errors import report_user_errors, reraise_user_errors

    ds = _numbers().map_batches(report_user_errors(FailsOnRowThree), batch_size=2, num_cpus=0.25,
                                compute=ray.data.ActorPoolStrategy(size=2), batch_format="numpy")
    with pytest.raises(UserError) as info:
        with reraise_user_errors():
            _consume(ds)
    assert type(info.value) is UserError and str(info.value) == SENTENCE


def test_user_error_of_an_actor_constructor_reaches_the_driver(ray_session):
    import ray

    from blip2_ray.runtime.user_errors import report_user_errors, reraise_user_errors

    ds = _numbers().map_batches(report_user_errors(FailsToStart), fn_constructor_kwargs={"reason": "model 'm' has "
                                "no config.json; pass an export directory"}, batch_size=2, num_cpus=0.25,
                                compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy")
    with pytest.raises(UserError) as info:
        with reraise_user_errors():
            _consume(ds)
    assert str(info.value) == "model 'm' has no config.json; pass an export directory"


def test_user_error_of_a_generator_task_reaches_the_driver(ray_session):
    from blip2_ray.runtime.user_errors import report_user_errors, reraise_user_errors

    ds = _numbers().map_batches(report_user_errors(yields_then_fails), batch_size=2, num_cpus=0.25)
    with pytest.raises(UserError) as info:
        with reraise_user_errors():
            _consume(ds)
    assert type(info.value) is UserError and str(info.value) == SENTENCE


def test_a_late_message_of_an_earlier_dataset_is_not_raised_for_this_failure(ray_session):
    """Seen under load: the second actor of an earlier pool (the constructor test above) reported its message after
    this block had emptied the box, and that message was raised for this failure."""
    import ray

    from blip2_ray.runtime.user_errors import BOX_NAMESPACE, _box_name, report_user_errors, reraise_user_errors

    ds = _numbers().map_batches(report_user_errors(yields_then_fails), batch_size=2, num_cpus=0.25)
    with pytest.raises(UserError) as info:
        with reraise_user_errors():
            box = ray.get_actor(_box_name(), namespace=BOX_NAMESPACE)
            ray.get(box.put.remote("model 'm' has no config.json; pass an export directory"))  # the late one
            _consume(ds)
    assert type(info.value) is UserError and str(info.value) == SENTENCE


def test_user_error_of_a_plain_actor_comes_from_the_ray_task_error_cause(ray_session):
    import ray

    from blip2_ray.runtime.user_errors import reraise_user_errors

    @ray.remote(num_cpus=0)
    class Loader:
        def load(self):
            raise UserError(SENTENCE)

    with pytest.raises(UserError) as info:
        with reraise_user_errors():
            ray.get(Loader.remote().load.remote())
    assert type(info.value) is UserError and str(info.value) == SENTENCE


def test_other_failures_stay_what_they_are_and_a_stale_message_is_not_reused(ray_session):
    import ray

    from blip2_ray.runtime.user_errors import report_user_errors, reraise_user_errors

    with pytest.raises(UserError):
        with reraise_user_errors():
            _consume(_numbers().map_batches(report_user_errors(yields_then_fails), batch_size=2, num_cpus=0.25))
    ds = _numbers().map_batches(report_user_errors(FailsWithABug), batch_size=2, num_cpus=0.25,
                                compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy")
    with pytest.raises(Exception) as info:
        with reraise_user_errors():
            _consume(ds)
    assert not isinstance(info.value, UserError) and "not a user error" in str(info.value)


def test_a_wrapped_actor_works_as_before_when_nothing_fails(ray_session):
    import ray

    from blip2_ray.runtime.user_errors import report_user_errors, reraise_user_errors

    ds = _numbers(3).map_batches(report_user_errors(FailsOnRowThree), batch_size=2, num_cpus=0.25,
                                 compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy")
    with reraise_user_errors():
        got = np.concatenate([b["n"] for b in _consume(ds)])
    assert sorted(got.tolist()) == [0, 2, 4]


class Tagged:
    """Counts its own constructions (a process-wide counter) and says which process and mode served a batch."""

    built = 0

    def __init__(self, scale: int):
        Tagged.built += 1
        self.scale = scale

    def __call__(self, batch, mode="plain"):
        import os

        n = len(batch["n"])
        return {"n": batch["n"] * self.scale, "pid": np.full(n, os.getpid()), "built": np.full(n, Tagged.built),
                "mode": np.array([mode] * n, dtype=object), "blob": batch["blob"]}


def test_a_model_pool_builds_its_actors_once_for_every_pass(ray_session):
    from blip2_ray.runtime.compute import ComputeConfig, ModelPool

    compute = ComputeConfig(num_actors=2, num_cpus_per_actor=0.25, num_gpus_per_actor=0)
    rows = [{"n": i, "blob": bytes([i, 0, 0])} for i in range(10)]  # bytes with trailing NULs stay whole
    with ModelPool(Tagged, compute, len(rows), scale=3) as pool:
        first = list(pool.map(rows, 3))
        second = list(pool.map(rows[:4], 2, mode="itm"))
        pids = {int(p) for b in first + second for p in b["pid"]}
    assert sorted(int(n) for b in first for n in b["n"]) == [3 * i for i in range(10)]
    assert sorted(int(n) for b in second for n in b["n"]) == [0, 3, 6, 9]
    assert {m for b in first for m in b["mode"]} == {"plain"} and {m for b in second for m in b["mode"]} == {"itm"}
    assert {bytes(x) for b in first for x in b["blob"]} == {bytes([i, 0, 0]) for i in range(10)}
    assert 1 <= len(pids) <= 2 and {int(x) for b in first + second for x in b["built"]} == {1}  # built once each
    assert len(pool.actors) == 2


def test_user_error_of_a_model_pool_constructor_reaches_the_driver(ray_session):
    from blip2_ray.runtime.compute import ComputeConfig, ModelPool
    from blip2_ray.runtime.user_errors import reraise_user_errors

    compute = ComputeConfig(num_actors=1, num_cpus_per_actor=0.25, num_gpus_per_actor=0)
    with pytest.raises(UserError) as info:
        with reraise_user_errors(), ModelPool(FailsToStart, compute, 4, reason=SENTENCE) as pool:
            list(pool.map([{"n": i} for i in range(4)], 2))
    assert type(info.value) is UserError and str(info.value) == SENTENCE
