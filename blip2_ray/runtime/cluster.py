"""Ray start-up for every job, and a free local port for the servers tests and benchmarks start."""

from __future__ import annotations

import os
import socket

# Every worker of every job: HF tokenizers' thread pool warns, and can deadlock, once a process forks.
WORKER_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false"}


def init_ray(address: str | None = None, *, env_vars: dict[str, str] | None = None, **init_kwargs) -> bool:
    """Connect this process to Ray; True when it started a new local instance (which it then owns).

    `address` (a job's --address) wins, then RAY_ADDRESS (set by `ray job submit`); with neither a new
    local instance starts. Never a bare `ray.init()`: that joins the latest cluster started on the
    machine, which may be a stranger's. Workers get WORKER_ENV_VARS plus `env_vars`; `init_kwargs` go to
    `ray.init` (num_cpus, include_dashboard, ...). Already connected: does nothing and returns False.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, runtime_env={"env_vars": {**WORKER_ENV_VARS, **(env_vars or {})}}, **init_kwargs)
    return address == "local"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at `host` right now (another process may still take it first)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
