"""The start-up resource check (train/resources.py) and the data-stall guard (train/batches.py), no Ray."""

from __future__ import annotations

import threading
import time

import pytest

from blip2_ray.config import from_dict
from blip2_ray.errors import UserError
from blip2_ray.train.batches import BatchFeed
from blip2_ray.train.config import PretrainConfig
from blip2_ray.train.resources import ResourcePlan, check_cluster, fits, plan_error


def cfg(**scaling) -> PretrainConfig:
    return from_dict(PretrainConfig, {"data": {"image_size": 32, "num_cpus_per_decode_task": 0.5},
                                      "train": {"global_batch_size": 8, "micro_batch_size": 4},
                                      "scaling": {"num_workers": 2, **scaling}})


def test_two_workers_and_a_decode_task_on_two_cpus():
    two = [{"CPU": 2.0}]
    assert not fits(two, ResourcePlan.of(cfg(cpus_per_worker=1.0)))  # the hang of issue 14: 2 + 0.5 > 2
    assert fits(two, ResourcePlan.of(cfg(cpus_per_worker=0.75)))  # the shipped tiny configs: 1.5 + 0.5
    assert fits([{"CPU": 4.0}], ResourcePlan.of(cfg(cpus_per_worker=1.0)))  # make demo's 4 logical CPUs


def test_each_bundle_needs_one_node():
    plan = ResourcePlan(2, {"CPU": 1.0}, {"CPU": 1.0})
    assert not fits([{"CPU": 1.5}, {"CPU": 1.5}], plan)  # 3 CPUs in all, but no node holds a worker + the task
    assert fits([{"CPU": 1.0}, {"CPU": 2.0}], plan)
    gpu = ResourcePlan.of(cfg(use_gpu=True, cpus_per_worker=8))
    head, a100 = {"CPU": 0.0}, {"CPU": 96.0, "GPU": 8.0}
    assert not fits([head], gpu) and fits([head, a100], gpu)
    assert not fits([head, {"CPU": 16.0, "GPU": 8.0}], gpu)  # 2 x 8 CPUs leave none for decoding


def test_the_error_names_the_numbers_and_what_fits():
    msg = plan_error([{"CPU": 2.0}], ResourcePlan.of(cfg(cpus_per_worker=1.0)))
    assert msg.startswith("the cluster cannot run 2 training workers (scaling.cpus_per_worker=1 CPU each) and a data "
                          "decode task (data.num_cpus_per_decode_task=0.5 CPU) at the same time: it has 2 CPUs on 1 "
                          "node and 0 GPUs;")
    assert "scaling.cpus_per_worker=0.75" in msg and "scaling.num_workers=1" in msg
    wide = plan_error([{"CPU": 3.0}], ResourcePlan(2, {"CPU": 1.0}, {"CPU": 1.5}))
    assert "data.num_cpus_per_decode_task=1" in wide and "scaling.cpus_per_worker=0.75" in wide
    assert plan_error([{"CPU": 8.0}], ResourcePlan.of(cfg(use_gpu=True))).endswith("add nodes")  # no GPU at all


def test_check_cluster_fails_at_once_or_waits_for_the_autoscaler(monkeypatch):
    import ray.autoscaler.sdk

    from blip2_ray.train import resources

    nodes = [[{"CPU": 2.0}]]
    requests = []
    monkeypatch.setattr(resources, "alive_nodes", lambda: nodes[-1])
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: requests.append(bundles))
    slept = []
    with monkeypatch.context() as m, pytest.raises(UserError, match="cannot run 2 training workers"):
        m.setattr(resources.time, "sleep", slept.append)
        check_cluster(cfg())
    assert slept == [] and requests == []  # at once: no wait (not timed, which a busy machine could exceed)
    check_cluster(cfg(cpus_per_worker=0.75))  # fits: returns

    def grow():  # an autoscaler adding a node after a moment
        time.sleep(0.2)
        nodes.append([{"CPU": 2.0}, {"CPU": 2.0}])

    threading.Thread(target=grow).start()
    check_cluster(cfg(resource_wait_s=10), poll_s=0.05)
    assert requests[0] == [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 0.5}] and requests[-1] == []
    nodes.append([{"CPU": 2.0}])
    with pytest.raises(UserError, match=r"after waiting 0 s \(scaling.resource_wait_s\)"):
        check_cluster(cfg(resource_wait_s=0.2), poll_s=0.05)


def test_batch_feed_times_out_with_the_diagnosis_and_passes_errors_on():
    release = threading.Event()

    def stuck():
        yield 1
        release.wait(5)  # the data never comes
        yield 2

    feed = BatchFeed(stuck(), timeout_s=0.3, on_stall=lambda waited: RuntimeError(f"no batch for {waited:.1f} s"))
    assert next(feed) == 1
    # the stall is diagnosed after the timeout, while the data is still held back (it would come after 5 s, and
    # then `next` would return it instead of raising): the feed's own measure of its wait, not a timing assertion
    with pytest.raises(RuntimeError, match=r"no batch for 0\.\d s"):
        next(feed)
    release.set()
    feed.close()

    def broken():
        yield "a"
        raise ValueError("corrupt")

    feed = BatchFeed(broken(), timeout_s=5, on_stall=lambda w: AssertionError("no stall here"))
    assert next(feed) == "a"
    with pytest.raises(ValueError, match="corrupt"):
        next(feed)
    assert list(BatchFeed(iter([1, 2]), 0, lambda w: None)) == [1, 2]  # 0: no limit; the end ends it


def test_contrast_set_warning_names_the_per_step_size():
    def warnings_of(**train):
        return from_dict(PretrainConfig, {"data": {"image_size": 32}, "train": train,
                                          "scaling": {"num_workers": 4}}).start_warnings()

    w = warnings_of(global_batch_size=1680, micro_batch_size=105)  # the paper's batch on 4 workers: 4 steps
    assert len(w) == 1 and "gradient accumulation 4" in w[0] and "420 samples" in w[0]
    assert "global batch of 1680" in w[0] and "the paper contrasts 1680" in w[0]
    assert warnings_of(global_batch_size=420, micro_batch_size=105) == []  # no accumulation: the whole batch


def test_bf16_with_a_float16_llm_warns_in_stage_2():
    c = from_dict(PretrainConfig, {"stage": 2, "data": {"image_size": 32}, "model": {"llm": {"dtype": "float16"}},
                                   "train": {"global_batch_size": 8, "micro_batch_size": 4}})
    assert any("float16 LLM" in w for w in c.start_warnings())


def test_shipped_gpu_configs_fit_cluster_yaml_once_it_has_scaled_up():
    """What the start-up check sees after scaling.resource_wait_s on the shipped cluster: each node type at
    its max_workers (the head runs no tasks). The shipped tiny configs fit a 2-CPU machine."""
    import glob
    from pathlib import Path

    import yaml

    from blip2_ray.config import load_config

    root = Path(__file__).resolve().parents[2]
    cluster = yaml.safe_load((root / "cluster.yaml").read_text())
    nodes = [dict(t["resources"]) for t in cluster["available_node_types"].values()
             for _ in range(t.get("max_workers", 1))]
    for path in sorted(glob.glob(str(root / "jobs/configs/stage[12]_*.yaml"))):
        cfg = load_config(PretrainConfig, path)
        if cfg.scaling.use_gpu:
            assert cfg.scaling.resource_wait_s > 0, path  # GPU nodes start on demand
            assert fits(nodes, ResourcePlan.of(cfg)), path
        else:
            assert fits([{"CPU": 2.0}], ResourcePlan.of(cfg)), path
