"""The shared job runtime without a Ray instance: start-up choices, the command line, pools, files."""

from __future__ import annotations

import contextlib
import os

import pytest

from blip2_ray.config import ConfigError, from_dict
from blip2_ray.errors import UserError
from blip2_ray.runtime import cli, cluster, compute, files


@pytest.fixture
def ray_init_calls(monkeypatch):
    """Record ray.init's arguments instead of starting Ray."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    return calls


def test_init_ray_address_then_ray_address_then_a_new_local_instance(ray_init_calls, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    for name in cluster.LOCAL_INSTANCE_ENV:
        monkeypatch.delenv(name, raising=False)
    assert cluster.init_ray("ray://head:10001") is False
    assert cluster.init_ray(None) is False
    assert not set(cluster.LOCAL_INSTANCE_ENV) & set(os.environ)  # a cluster's runs keep Ray Train's watcher
    monkeypatch.delenv("RAY_ADDRESS")
    assert cluster.init_ray(None, env_vars={"DS_ACCELERATOR": "cpu"}, num_cpus=4) is True
    assert [c["address"] for c in ray_init_calls] == ["ray://head:10001", "10.0.0.1:6379", "local"]
    quiet = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
             "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_DATA_LOG_LEVEL": "WARNING"}  # pytest's stdout: no terminal
    assert ray_init_calls[0]["runtime_env"] == {"env_vars": quiet}
    assert ray_init_calls[2]["runtime_env"] == {"env_vars": {**quiet, "DS_ACCELERATOR": "cpu"}}
    assert ray_init_calls[2]["num_cpus"] == 4
    assert os.environ[cluster.PREEMPTION_WATCHER_ENV] == "0"  # a local instance has no autoscaler to drain nodes
    assert os.environ[cluster.SERVE_PROXY_READY_ENV] == "30"  # Serve's proxy has 30 s to start, not 5
    # only the instance it starts gets the worker-pool settings (joining a cluster with them is an error in Ray)
    assert ray_init_calls[2]["_system_config"] == {"idle_worker_killing_time_threshold_ms": 60_000}
    assert "_system_config" not in ray_init_calls[0] and "_system_config" not in ray_init_calls[1]


def test_progress_bars_only_on_a_terminal_unless_asked(ray_init_calls, monkeypatch):
    """--progress auto|on|off: Ray Data's bars in the job's workers (environment) and in this process (DataContext)."""
    import sys

    from ray.data import DataContext

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert cluster.progress_bars("auto") and cluster.progress_bars("on") and not cluster.progress_bars("off")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert not cluster.progress_bars("auto") and cluster.progress_bars("on")
    with pytest.raises(ValueError, match="progress must be one of auto, on, off"):
        cluster.progress_bars("sometimes")
    import logging

    saved, level = DataContext.get_current().enable_progress_bars, logging.getLogger("ray.data").level
    try:
        for choice, bars in (("on", True), ("off", False)):
            cluster.init_ray("local", progress=choice)
            assert ray_init_calls[-1]["runtime_env"]["env_vars"]["RAY_DATA_DISABLE_PROGRESS_BARS"] == str(int(not bars))
            assert DataContext.get_current().enable_progress_bars is bars
    finally:
        DataContext.get_current().enable_progress_bars = saved
        logging.getLogger("ray.data").setLevel(level)
    assert cli.job_parser("x").parse_args(["--progress", "off"]).progress == "off"


def test_init_ray_does_nothing_when_connected(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    assert cluster.init_ray("somewhere") is False  # the guard's ray.init would raise if it were called


def test_free_port_is_bindable():
    import socket

    port = cluster.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = cluster.free_ports(12)
    assert len(set(ports)) == 12
    with contextlib.ExitStack() as stack:  # all at once: none is taken twice
        for port in ports:
            stack.enter_context(socket.socket()).bind(("127.0.0.1", port))


def test_job_parser_flags():
    p = cli.job_parser("x", config_help="YAML", json_help="one JSON line")
    args = p.parse_args(["--config", "c.yaml", "--set", "a=1", "--set", "b.c=2", "--address", "auto", "--json"])
    assert (args.config, args.set, args.address, args.json) == ("c.yaml", ["a=1", "b.c=2"], "auto", True)
    with pytest.raises(SystemExit):
        p.parse_args([])  # --config is required
    bare = cli.job_parser("y").parse_args([])
    assert bare.set == [] and bare.address is None and not hasattr(bare, "config") and not hasattr(bare, "json")


def test_cli_main_turns_user_errors_into_one_line_and_exit_2(capsys):
    @cli.cli_main
    def fails(kind):
        raise kind("model 'x' does not exist; pass an export directory")

    assert fails(UserError) == 2 and fails(ConfigError) == 2
    assert capsys.readouterr().err.splitlines() == ["error: model 'x' does not exist; pass an export directory"] * 2
    with pytest.raises(KeyError):
        fails(KeyError)  # a bug keeps its traceback
    assert cli.cli_main(lambda: None)() == 0


def test_compute_section_pool_and_device():
    c = from_dict(compute.ComputeConfig, {"num_actors": 4, "num_gpus_per_actor": 0.5, "num_cpus_per_actor": 2})
    pool = compute.actor_pool(c, num_items=3)
    assert (pool["compute"].min_size, pool["compute"].max_size) == (3, 3)
    assert (pool["num_gpus"], pool["num_cpus"]) == (0.5, 2.0)
    assert compute.actor_pool(c, num_items=0)["compute"].max_size == 1
    with pytest.raises(ConfigError, match="num_actors and batch_size must be >= 1"):
        from_dict(compute.ComputeConfig, {"batch_size": 0})
    import torch

    if not torch.cuda.is_available():
        assert compute.device_and_dtype("auto") == ("cpu", "float32")
        assert compute.device_and_dtype("bfloat16") == ("cpu", "bfloat16")


def test_atomic_path_appears_complete_or_not_at_all(tmp_path):
    final = str(tmp_path / "out" / "report.json")
    with files.atomic_path(final) as tmp:
        open(tmp, "w").write("{}")
        assert not os.path.exists(final) and files.stale_temporaries(final) == [tmp]
        assert os.path.basename(tmp).startswith(".report.json.") and tmp.endswith(".tmp")
    assert open(final).read() == "{}" and files.stale_temporaries(final) == []
    with pytest.raises(RuntimeError):
        with files.atomic_path(final) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("interrupted")
    assert open(final).read() == "{}" and os.listdir(tmp_path / "out") == ["report.json"]
    files.write_json_atomic(final, {"a": [1, 2]})
    assert open(final).read() == '{"a": [1, 2]}'


def test_heartbeat_speaks_after_every_s_of_silence_only():
    from blip2_ray.runtime.heartbeat import Heartbeat

    now = [100.0]
    lines = []
    beat = Heartbeat("[stage1] ", every_s=25, out=lambda line, flush: lines.append(line), clock=lambda: now[0])
    beat.phase("building the model")
    now[0] += 24
    assert beat.tick() is None  # 24 s of silence: nothing yet
    now[0] += 2
    assert beat.tick() == "[stage1] building the model (26 s so far)"
    now[0] += 10
    beat.said()  # the job printed its own line: the next heartbeat is 25 s after it
    now[0] += 20
    assert beat.tick() is None
    beat.phase("exporting the model")
    now[0] += 6
    assert beat.tick() == "[stage1] exporting the model (6 s so far)" and len(lines) == 2
    with Heartbeat("x", enabled=False) as off:  # other ranks: no thread
        assert off._thread is None


def test_model_pool_batches_keep_every_value_as_it_was():
    import numpy as np

    rows = [{"idx": 0, "image": b"\x01\x00\x00", "text": "a", "cands": np.array([2, 5])},
            {"idx": 1, "image": b"", "text": "bb", "cands": np.array([], np.int64)}]
    b = compute.columns(rows)
    assert b["idx"].dtype.kind == "i" and b["idx"].tolist() == [0, 1]
    # np.asarray would make bytes a fixed-width 'S' array, which drops trailing NUL bytes of an image
    assert b["image"].dtype == object and b["image"].tolist() == [b"\x01\x00\x00", b""]
    assert b["text"].tolist() == ["a", "bb"]
    assert b["cands"].dtype == object and [c.tolist() for c in b["cands"]] == [[2, 5], []]
    one = compute.columns([{"cands": np.array([7])}])["cands"]  # a one-element array stays an array
    assert one.dtype == object and isinstance(one[0], np.ndarray) and one[0].tolist() == [7]
