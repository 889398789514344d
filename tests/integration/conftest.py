"""Integration tests: every test in this folder is marked `integration` here (and only here), so that
`pytest -m "not integration"` selects the Ray-free rest. The session fixtures they share: one local Ray
instance, a real S3 server, tiny model exports."""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import pytest

from blip2_ray.runtime.cluster import WORKER_POOL_CONFIG, free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@pytest.hookimpl(tryfirst=True)  # before the `-m` selection reads the marks
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, tiny_tokenizers) -> dict[str, str]:
    """Randomly initialised tiny models exported in HF format: {"stage1", "stage2"} -> directory (read only)."""
    import torch

    from blip2_ray.model.config import model_config
    from blip2_ray.weights.builders import build_stage1, build_stage2
    from blip2_ray.weights.hf_format import export_stage1, export_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_exports")
    cfg = model_config("tiny")
    tok = llm_tokenizer(cfg)
    export_stage2(build_stage2(cfg, tok), str(root / "stage2"), tok, cfg)
    export_stage1(build_stage1(cfg), str(root / "stage1"), qformer_tokenizer(cfg), cfg)
    return {"stage1": str(root / "stage1"), "stage2": str(root / "stage2")}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (never `ray stop`: others may share the machine).

    `address="local"` always starts a new instance rather than joining RAY_ADDRESS or the latest cluster
    on the machine. Yields the address other processes (jobs, Train workers) can join.
    """
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # `make test` runs several sessions at once (xdist): on a loaded 2-core machine a worker group can take longer
    # than Train's default 60 s to start. The raylet started here passes it on to every worker, a job's too.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    for attempt in range(3):  # a raylet has 30 s to register, which a loaded machine can exceed: start again
        temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
        try:
            ctx = ray.init(
                address="local",
                num_cpus=4,
                include_dashboard=False,
                _temp_dir=temp_dir,
                log_to_driver=True,
                object_store_memory=1_000_000_000,
                _system_config=dict(WORKER_POOL_CONFIG),  # as a job's own instance (runtime/cluster.py)
                runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
                                          "HF_HUB_OFFLINE": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            )
            break
        except Exception as e:
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
    yield ctx.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto, server mode) on 127.0.0.1 with one bucket.

    Yields {"endpoint_url", "bucket", "client"}; AWS_ACCESS_KEY_ID/SECRET are "testing" while it runs
    (the data pipeline hands them to its Ray tasks explicitly).
    """
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="shards")
    try:
        yield {"endpoint_url": endpoint, "bucket": "shards", "client": client}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def wait_until_served(client, path: str = "/healthz", timeout_s: float = 120, headers: dict | None = None) -> None:
    """Poll GET `path` through `client` (an httpx.Client) until it answers 200: Serve's proxy can refuse or 503 for a
    moment after `serve.run` returns on a busy machine. Bounded: AssertionError after `timeout_s`."""
    import httpx

    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            r = client.get(path, headers=headers)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.TransportError as e:
            last = repr(e)
        time.sleep(0.5)
    raise AssertionError(f"{path} not ready after {timeout_s} s (last answer: {last})")


@pytest.fixture(scope="session")
def until_served():
    """`wait_until_served` (for module fixtures that start a Serve app)."""
    return wait_until_served


@pytest.fixture(scope="session")
def job_main():
    """jobs/<name>.py's `main`, loaded into this process: job_main("capfilt")(argv) -> its exit code. On the
    session's Ray (a job joins the Ray this process is connected to), without a Python start per call."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main

    return load


@pytest.fixture(scope="session")
def finetune_job(ray_session, job_main):
    """jobs/finetune.py run in this process on the session's Ray (its `main`: flags, checks, job, exit code):
    (config file, ["key=value", ...]) -> the finetune_report.json it wrote to output_dir."""
    main = job_main("finetune")

    def run(config, sets: list[str]) -> dict:
        rc = main(["--config", str(config), *[a for s in sets for a in ("--set", s)]])
        assert rc == 0, f"jobs/finetune.py exited with {rc}"
        out = next(s.split("=", 1)[1] for s in reversed(sets) if s.startswith("output_dir="))
        return json.loads((Path(out) / "finetune_report.json").read_text())

    return run
