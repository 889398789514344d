"""Ray start-up for every job, and a free local port for the servers tests and benchmarks start."""

from __future__ import annotations

import contextlib
import os
import socket
import sys

# Every worker of every job: HF tokenizers' thread pool warns, and can deadlock, once a process forks. Ray
# Train's print patch sends a worker's print both to its logger and to stdout (every line twice on the console):
# off, so a print is one line.
WORKER_ENV_VARS = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
PROGRESS_CHOICES = ("auto", "on", "off")
# The raylet's worker pool. Ray kills a task worker that has been idle for 1 s once the node has more workers than
# CPUs. A streaming pipeline reads in bursts (the trainer's backpressure pauses it), and every burst then started
# new workers, each importing the tokenizers (transformers, torch) again: ~5 s of CPU apiece. The instruct test's
# training started 13 read workers; with idle workers kept for 60 s it starts 6, and its job takes 74 s, not 90 s
# (the 2-core machine). Given to every instance a job starts (init_ray), and to `ray start` by cluster.yaml.
WORKER_POOL_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # read by the driver's Ray Train (passed to its runs)
# Ray Serve's controller kills a starting HTTP proxy that has not reported ready within this many seconds (Ray: 5),
# and `serve.start` fails with ActorDiedError: a loaded 2-core machine took longer (a test run, 2026-12-07)
SERVE_PROXY_READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
# what a local instance that init_ray starts gets in its environment (its raylet and every worker inherit it), unless
# the user set it: no preemption watcher (Ray Train's actor per run acts only on nodes an autoscaler drains, which a
# local instance has none of; on one it only printed Ray's error line about its restart arguments at each run), and
# 30 s for Serve's proxy to start
LOCAL_INSTANCE_ENV = {PREEMPTION_WATCHER_ENV: "0", SERVE_PROXY_READY_ENV: "30"}


def worker_pool_env() -> dict[str, str]:
    """WORKER_POOL_CONFIG as the environment of `ray start` (RAY_<name>)."""
    return {f"RAY_{k}": str(v) for k, v in WORKER_POOL_CONFIG.items()}


def progress_bars(choice: str = "auto") -> bool:
    """Whether Ray Data draws its progress bars: "on", "off", or "auto" (only when stdout is a terminal: in a log
    file or `ray job logs` each redraw is one more line)."""
    if choice not in PROGRESS_CHOICES:
        raise ValueError(f"progress must be one of {', '.join(PROGRESS_CHOICES)}, not {choice!r}")
    return sys.stdout.isatty() if choice == "auto" else choice == "on"


def set_progress_bars(on: bool) -> None:
    """Ray Data's progress bars on or off in this process (the datasets it builds carry the setting); off, its
    INFO lines (each dataset execution's start and plan, once per epoch) stay in its log files."""
    import logging

    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = on
    logging.getLogger("ray.data").setLevel(logging.NOTSET if on else logging.WARNING)


def progress_env(on: bool) -> dict[str, str]:
    """The workers' environment for Ray Data's progress display (see `set_progress_bars`)."""
    return {"RAY_DATA_DISABLE_PROGRESS_BARS": "0"} if on else {"RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                                                                "RAY_DATA_LOG_LEVEL": "WARNING"}


def init_ray(address: str | None = None, *, env_vars: dict[str, str] | None = None, progress: str = "auto",
             **init_kwargs) -> bool:
    """Connect this process to Ray; True when it started a new local instance (which it then owns).

    `address` (a job's --address) wins, then RAY_ADDRESS (set by `ray job submit`); with neither a new
    local instance starts. Never a bare `ray.init()`: that joins the latest cluster started on the
    machine, which may be a stranger's. Workers get WORKER_ENV_VARS plus `env_vars`; `init_kwargs` go to
    `ray.init` (num_cpus, include_dashboard, ...); a new local instance gets WORKER_POOL_CONFIG and
    LOCAL_INSTANCE_ENV. `progress` (a job's --progress): Ray Data's progress bars, here and in the job's workers
    (see `progress_bars`). Already connected: does nothing and returns False.
    """
    import ray

    if ray.is_initialized():
        return False
    bars = progress_bars(progress)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    env = {**WORKER_ENV_VARS, **progress_env(bars), **(env_vars or {})}
    if address == "local":
        init_kwargs.setdefault("_system_config", dict(WORKER_POOL_CONFIG))
        for name, value in LOCAL_INSTANCE_ENV.items():
            os.environ.setdefault(name, value)
    ray.init(address=address, runtime_env={"env_vars": env}, **init_kwargs)
    set_progress_bars(bars)
    return address == "local"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at `host` right now (another process may still take it first)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports nobody listens on at `host` right now. All are held open until all are chosen: ports
    taken one `free_port` at a time can repeat (the kernel may hand a just-closed port out again), and `ray start`
    refuses a port given to two of its components (seen: runtime_env_agent and client_server both 51335)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
