"""Shared fixtures. Unit tests need no Ray; integration tests share one local Ray instance per session."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the 'tiny' tokenizers are built once per test session here (Ray workers inherit the variable)
os.environ.setdefault("BLIP2_RAY_CACHE", tempfile.mkdtemp(prefix="blip2_ray_cache_"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
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
    from blip2_ray.model.tokenizers import build_tiny_tokenizers, default_tiny_tokenizer_dir

    return build_tiny_tokenizers(default_tiny_tokenizer_dir())


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory, tiny_tokenizers) -> dict[str, str]:
    """Randomly initialised tiny models exported in HF format: {"stage1", "stage2"} -> directory (read only)."""
    import torch

    from blip2_ray.model.builders import build_stage1, build_stage2
    from blip2_ray.model.config import model_config
    from blip2_ray.model.hf_format import export_stage1, export_stage2
    from blip2_ray.model.tokenizer_paths import llm_tokenizer, qformer_tokenizer

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
    temp_dir = tempfile.mkdtemp(prefix="ray_", dir="/tmp")
    ctx = ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=True,
        object_store_memory=1_000_000_000,
        runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}},
    )
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
