"""Shared by every test: the environment, GPU skips, the tiny tokenizers, and the rule that only
integration tests (tests/integration, marked there by its conftest) may start Ray."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's preemption watcher (an actor per run, ~3 CPU s each: 33.8 CPU s over the integration tests, measured
# with tools/suite_cpu.py) only acts on nodes that an autoscaler drains; the suite's local instances have none.
# Jobs the tests start inherit the setting (Ray Train passes it from the driver to its controller). A literal: this
# runs before any project import (the same name as blip2_ray.runtime.cluster.PREEMPTION_WATCHER_ENV).
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray's log monitor looks for new log files every 0.1 s until a node has 1000 of them, then every 0.5 s; the suite's
# instances run for the whole session (65.8 CPU s in 3 log monitors over the integration tests): every 0.5 s from
# the start (an idle instance: 0.65 -> 0.34 CPU s a minute); a new worker's log file is found up to 0.5 s later.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# Ray Serve's controller kills a starting HTTP proxy that has not answered its ready check within 5 s, and
# `serve.start` then fails with ActorDiedError: on the loaded 2-core machine a proxy took longer (5958178's loaded
# run, 2026-12-07: "Proxy actor reported not ready" at 5 s intervals, then all 3 test_serve_streaming.py tests errored
# at setup). The suite's instances give a proxy 30 s (Ray reads it in the controller, which inherits it), as
# runtime/cluster.py LOCAL_INSTANCE_ENV gives a job's own local instance (a literal here, as above).
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
# One OpenMP / torch thread in every process the suite starts (the pytest workers: torch reads it at its import,
# which comes after this; the jobs and DeepSpeed children they start; the Ray workers: Ray keeps a value that is
# set), and Ray's workers at nice 0 (Ray's default is 15: beside a CPU-bound process at nice 0, CFS gives a nice-15
# worker about 1/30 of the core they share). Loaded (`make test`'s arguments through tools/suite_loaded.sh,
# 2026-12-07, same day, clean clones): 1870.77 s with both and the schedule below (fd26f0e), 3071.40 s without
# (875cfa2). The catch: a Ray node that a test starts of its own (the cluster-jobs head, the multinode scenario's
# head) failed to start whenever the other pytest worker's nice-0 Ray workers were busy (6 failed starts in two
# loaded runs; the multinode head twice in a third; "Deadline Exceeded", then "GCS cannot find the node"). Likely
# (not confirmed from the raylets' logs, which the tests remove): a raylet waits 15 s for its dashboard agent's port
# file and exits before it registers (ray-project/ray#65983), and the agent, a nice-0 Python process importing the
# dashboard's modules, gets only a share of a core. Hence the schedule below: those files start their clusters
# while the other worker runs the files that use no Ray.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_worker_niceness", "0")
# the 'tiny' tokenizers are built once per test session here (Ray workers inherit the variable)
_OWN_CACHE = None if os.environ.get("BLIP2_RAY_CACHE") else tempfile.mkdtemp(prefix="blip2_ray_cache_")
if _OWN_CACHE:
    os.environ["BLIP2_RAY_CACHE"] = _OWN_CACHE


def pytest_unconfigure(config):
    """The session's own cache goes with it (a cache the caller named stays)."""
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _say_current_test(text: str) -> None:
    """tools/suite_cpu.py --by-test: the test that runs now, written where the tool reads it."""
    path = os.environ.get("SUITE_CPU_TEST_FILE")
    if path:
        tmp = f"{path}.{os.getpid()}.tmp"  # per process: two xdist workers writing one .tmp raced (FileNotFoundError)
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)


def pytest_runtest_logstart(nodeid, location):
    _say_current_test(nodeid)


def pytest_runtest_logfinish(nodeid, location):
    _say_current_test("")


# `make test` runs the suite on 2 xdist workers (`-n 2 --dist loadfile --no-loadscope-reorder`). The unit of work is a
# file, or the files of one group in ONE_WORKER, which run one after another on one worker (the scheduler below).
# Units start in this order: ONE_WORKER's groups, the files not in LONGEST_FIRST (in collection order), then
# LONGEST_FIRST's longest first, so that the short files fill in at the end instead of one long file running alone
# while the other worker idles. Seconds: each file's tests on the loaded 2-core machine (`make test` with a CPU-bound
# process beside it, 2026-12-06). The order is only a schedule, no test depends on it. Each worker has its own
# session fixtures, so its own local Ray instance. (3 workers, tried on the same loaded machine: slower, 1669 s, and
# the cluster-jobs head did not come up in 180 s. One pytest process, no xdist, tried loaded on 2026-12-08 against
# `-n 2` on the same machine the same day, 1270f68: slower, 980.53 s against 783.63 s, both 591 passed.)
LONGEST_FIRST = {
    "test_train_pretrain.py": 300, "test_finetune_job.py": 265, "test_finetune_instruct.py": 228,
    "test_serve_api.py": 220, "test_finetune_vqa.py": 213, "test_cluster_jobs.py": 200, "test_multinode.py": 192,
    "test_capfilt_job.py": 160, "test_data_pipeline.py": 150, "test_search.py": 106, "test_eval_jobs.py": 95,
    "test_serve_streaming.py": 60, "test_train_zero3_build.py": 60, "test_user_errors_through_ray.py": 40,
    "test_llm_lora_zero3.py": 30,
}
# the files that start Ray clusters of their own (`ray start --head`, four raylets). They run on one worker, one after
# the other, first of all, while the other worker runs the files not in LONGEST_FIRST: the unit tests and the Ray-free
# integration files, no Ray workers (see the niceness above; 2026-12-07, loaded: both clusters started at their
# first attempt). Two such starts at once starved each other too (the cluster-jobs head beside test_multinode.py).
ONE_WORKER = {"own_ray_clusters": ("test_cluster_jobs.py", "test_multinode.py")}
_UNIT_OF = {name: group for group, names in ONE_WORKER.items() for name in names}


def _schedule(items) -> None:
    """Order the items: ONE_WORKER's groups, the files not in LONGEST_FIRST (no Ray), then LONGEST_FIRST's files longest
    first. The other worker runs the Ray-free files while the groups' clusters start."""
    first = [name for names in ONE_WORKER.values() for name in names]
    rank = {name: i for i, name in enumerate(first)}
    later = sorted((n for n in LONGEST_FIRST if n not in _UNIT_OF), key=lambda n: -LONGEST_FIRST[n])
    rank.update({name: len(first) + 1 + i for i, name in enumerate(later)})
    items.sort(key=lambda item: rank.get(Path(str(item.path)).name, len(first)))  # stable: file order kept within


def unit_of_work(nodeid: str) -> str:
    """The scheduler's unit of a test id: its file, or its ONE_WORKER group."""
    file = nodeid.split("::", 1)[0]
    return _UNIT_OF.get(Path(file).name, file)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile` with ONE_WORKER's groups as single units (xdist's own `loadgroup` marks do not group under
    pytest 9, whose test ids xdist 3.8 can no longer suffix)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesAndGroups(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of_work(nodeid)

    return FilesAndGroups(config, log)


def pytest_collection_modifyitems(config, items):
    _schedule(items)
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_tokenizers() -> dict[str, str]:
    """{"qformer", "opt", "t5", "llama", "qwen2"} -> tokenizer directories built offline (tiny sizes).

    The same directories the 'tiny' tokenizer setting of a model config resolves to.
    """
    from blip2_ray.weights.tiny_tokenizers import build_tiny_tokenizers, default_tiny_tokenizer_dir

    return build_tiny_tokenizers(default_tiny_tokenizer_dir())


@pytest.fixture(scope="session")
def tiny_blip_clip(tmp_path_factory) -> dict[str, str]:
    """Random tiny BLIP captioner and CLIP filter in the hub layouts of Salesforce/blip-image-captioning-large
    and openai/clip-vit-large-patch14, built offline: {"blip", "clip"} -> directory (read only)."""
    from blip2_ray.fixtures.capfilt_models import build_tiny_blip, build_tiny_clip

    root = tmp_path_factory.mktemp("tiny_blip_clip")
    return {"blip": build_tiny_blip(str(root / "blip-image-captioning-large")),
            "clip": build_tiny_clip(str(root / "clip-vit-large-patch14"))}


@pytest.fixture(autouse=True)
def _no_ray_outside_integration_tests(request, monkeypatch):
    """`-m "not integration"` must run without Ray: any other test that starts it fails, naming itself."""
    if request.node.get_closest_marker("integration") is not None:
        return
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{request.node.nodeid} starts Ray; move it to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)

