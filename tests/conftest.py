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
def tiny_tokenizers(tmp_path_factory) -> dict[str, str]:
    """{"qformer", "opt", "t5"} -> tokenizer directories built offline for the tiny preset."""
    from blip2_ray.model.tokenizers import build_tiny_tokenizers

    return build_tiny_tokenizers(tmp_path_factory.mktemp("tokenizers"))


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
