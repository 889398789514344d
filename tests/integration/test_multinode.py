"""Multi-node training, simulated: several raylets on this machine (`ray.cluster_utils.Cluster`).

    head     "data" node   num_cpus=2, resources {data_node: 2}   read + decode tasks (pinned here)
    3 nodes  "GPU" nodes   num_cpus=1, resources {train_node: 1}  one Train worker each, one spare

Stage 1 on the tiny preset, 2 workers, 4 steps (one epoch of the 32 records), checkpoint every 2. Once the
step-2 checkpoint exists, a node with a worker on it is removed; the worker group restarts from that checkpoint
on the surviving node + the spare and ends at exactly step 4, and across the restart every record of the epoch
was trained exactly once (the rows trained after the checkpoint and before the failure are rolled back with it).
This is the suite's failure-and-restart test (test_train_pretrain resumes a resubmitted run).

A driver joins one Ray instance at a time and the integration tests share `ray_session`, so the
scenario runs in a child Python process (this file run as a script) with its own cluster, temp dir,
ports and auth token, and prints its findings as one JSON line that the test checks.

The config has no field yet for custom resources, so the scenario builds the TorchTrainer (the project's:
torch_trainer_class) from the trainer's own pieces with `resources_per_worker={"CPU": 1, "train_node": 1}`, and
pins the Ray Data tasks to the data node through the dataset's DataContext scheduling strategy.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from blip2_ray.runtime.cluster import WORKER_POOL_CONFIG, free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# the head's GCS declares a node dead after 5 missed health checks 1 s apart (Ray's default: 3 s apart, ~15 s),
# each still given Ray's 10 s timeout: the removed node's workers are seen gone sooner, a slow answer is no death
NODE_DEATH_IN_SECONDS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}
# what Ray says when a raylet did not register within its 30 s (a limit written into ray/_private/node.py and
# cluster_utils), which the four raylets starting together on a loaded 2-core machine can exceed
RAY_START_TIMED_OUT = ("timed out during startup", "while waiting for node to startup")
# the scenario is stopped when it has shown no progress (output, files) for STALL_S, or after LIMIT_S in all: a total
# alone (was 420 s) is outlasted on a loaded machine by a run that is still progressing (2026-12-07: 420.35 s, beside
# two other files that start Ray clusters). The longest silence is its fault-injected pause (120 s), plus Ray's
# start of four raylets
STALL_S, LIMIT_S = 300, 1500


def _resources_per_node() -> dict[str, dict]:
    from ray._private.state import available_resources_per_node

    return available_resources_per_node()


def registered(run_dir: str, checkpoint: str, deadline: float) -> bool:
    """Whether Ray Train's controller has registered `checkpoint` of the run in `run_dir` by `deadline` (polled)."""
    snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    while time.time() < deadline:
        try:
            with open(snapshot) as f:
                if checkpoint in f.read():
                    return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def run_scenario(tmp: str) -> dict:
    """The whole multi-node run; returns what the test asserts on (runs in its own process)."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from trained_rows import surviving_rows

    from blip2_ray.config import load_config, to_dict
    from blip2_ray.data.readers import read_shard_records
    from blip2_ray.data.sources import list_shards
    from blip2_ray.fixtures.sample import make_sample_shards
    from blip2_ray.train.config import PretrainConfig
    from blip2_ray.train.loop import train_loop_per_worker
    from blip2_ray.train.trainer import (
        absolute_paths,
        build_train_dataset,
        check_inputs,
        read_train_state,
        run_config,
        torch_trainer_class,
    )

    shards = os.path.join(tmp, "shapes")
    make_sample_shards(shards, num=32, shards=2, image_size=32, seed=0)
    pid_dir = os.path.join(tmp, "pids")
    sets = {
        "stage": 1, "run_name": "multinode", "storage_path": f"{tmp}/runs", "output_dir": f"{tmp}/export",
        "model.preset": "tiny", "data.train": f"[{shards}]", "data.image_size": 32, "data.shuffle_buffer": 16,
        "data.decode_batch_size": 16, "data.num_cpus_per_decode_task": 0.5, "data.decode_concurrency": 2,
        "train.max_steps": 4, "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.precision": "fp32",
        "train.log_every": 1, "train.checkpoint_every": 2, "train.warmup_steps": 1,
        "scaling.num_workers": 2, "failure.max_failures": 2,
        # the last rank stops before step 3 (after the step-2 checkpoint): the window to remove its node
        "fault_injection.pid_dir": pid_dir, "fault_injection.at_step": 3, "fault_injection.pause_s": 120,
        "fault_injection.trained_keys_dir": os.path.join(tmp, "trained"),
    }
    cfg = absolute_paths(load_config(PretrainConfig, None, [f"{k}={v}" for k, v in sets.items()]))
    check_inputs(cfg)

    # distinct ports: the head's GCS and dashboard, and each node's dashboard agent
    gcs_port, dashboard_port, *agent_ports = free_ports(6)
    common = dict(include_dashboard=False, object_store_memory=150 * 1024 * 1024,
                  dashboard_agent_listen_port=agent_ports[0])
    # RAY_TMPDIR (set by the test) is short: Ray's unix sockets live under it (~107-byte limit)
    temp_dir = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), f"raymn_{os.getpid()}")
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        common, num_cpus=2, resources={"data_node": 2}, gcs_server_port=gcs_port, dashboard_port=dashboard_port,
        temp_dir=temp_dir, _system_config=dict(WORKER_POOL_CONFIG, **NODE_DEATH_IN_SECONDS)))
    try:
        train_nodes = [cluster.add_node(num_cpus=1, resources={"train_node": 1},
                                        **common | {"dashboard_agent_listen_port": port}) for port in agent_ports[1:]]
        ray.init(address=cluster.address, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu",
                                                                     "TOKENIZERS_PARALLELISM": "false"}})
        data_node_id = cluster.head_node.node_id
        train_node_ids = {n.node_id for n in train_nodes}

        # every read/decode task of this dataset runs on the data node (hard affinity)
        DataContext.get_current().scheduling_strategy = NodeAffinitySchedulingStrategy(data_node_id, soft=False)
        dataset = build_train_dataset(cfg)
        trainer = torch_trainer_class()(
            train_loop_per_worker,
            train_loop_config={"cfg": to_dict(cfg)},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                         resources_per_worker={"CPU": 1, "train_node": 1}),
            run_config=run_config(cfg),
            datasets={"train": dataset},
        )

        seen: dict = {}

        def remove_a_busy_node_after_first_checkpoint():
            pid_file = os.path.join(pid_dir, "worker.pid")
            deadline = time.time() + 240
            while time.time() < deadline and not os.path.exists(pid_file):
                time.sleep(0.2)
            if not os.path.exists(pid_file):
                return
            # the node goes once the controller has registered the step-2 checkpoint (it records what it registered
            # in the run's checkpoint_manager_snapshot.json, Ray Train's own file): not after a fixed pause, which a
            # busy machine can outlast. Bounded by the worker's pause (fault_injection.pause_s)
            seen["registered_before"] = registered(os.path.join(cfg.storage_path, cfg.run_name), "checkpoint_00000002",
                                                   deadline=time.time() + 100)
            per_node = _resources_per_node()
            seen["train_node_free_before"] = {n: per_node.get(n, {}).get("train_node", 0.0) for n in train_node_ids}
            seen["checkpoints_before"] = sorted(p for p in os.listdir(os.path.join(cfg.storage_path, cfg.run_name))
                                                if p.startswith("checkpoint_"))
            busy = [n for n in train_nodes if seen["train_node_free_before"][n.node_id] == 0.0]
            if busy:  # a node with a worker on it goes; the idle third node takes over its slot
                cluster.remove_node(busy[-1], allow_graceful=False)
                seen["removed"] = busy[-1].node_id

        remover = threading.Thread(target=remove_a_busy_node_after_first_checkpoint, daemon=True)
        remover.start()
        start = time.time()
        result = trainer.fit()
        remover.join(timeout=5)
        state = read_train_state(result.checkpoint) if result.checkpoint else {}
        return {
            "error": None if result.error is None else repr(result.error),
            "step": (result.metrics or {}).get("step"),
            "start_steps": (result.metrics or {}).get("start_steps"),
            "state_step": state.get("step"),
            "train_node_free_before": seen.get("train_node_free_before"),
            "checkpoints_before": seen.get("checkpoints_before"),
            "registered_before": seen.get("registered_before"),
            "node_removed": "removed" in seen,
            "export_has_config": os.path.exists(os.path.join(cfg.output_dir, "config.json")),
            "seconds": round(time.time() - start, 1),
            "trained_keys": sorted(key for _, key, _ in surviving_rows(cfg.fault_injection.trained_keys_dir)),
            "record_keys": sorted(r["key"] for path in list_shards(shards)
                                  for r in read_shard_records(path, cfg.data.image_keys, cfg.data.caption_keys,
                                                              lambda reason: None)),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_while_it_progresses(cmd: list[str], env: dict, out_dir, stall_s: float = STALL_S,
                            limit_s: float = LIMIT_S) -> tuple[int, str, str]:
    """Run `cmd` (its output in `out_dir`) until it exits; -> (exit code, stdout, stderr). Bounded by progress, not by
    a total that a busy machine can outlast: it is stopped (its process group) when neither its output nor any file
    under `out_dir` (shards, checkpoints, logs) has changed for `stall_s`, or after `limit_s` in all."""
    paths = [os.path.join(out_dir, "stdout.txt"), os.path.join(out_dir, "stderr.txt")]
    with open(paths[0], "w") as out, open(paths[1], "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True, start_new_session=True)
    start = last_change = time.time()
    last_state, stopped = None, None
    while proc.poll() is None:
        time.sleep(1)
        state = _tree_state(str(out_dir))
        if state != last_state:
            last_state, last_change = state, time.time()
        if time.time() - last_change > stall_s or time.time() - start > limit_s:
            stopped = f"stopped: no progress for {stall_s:.0f} s" if time.time() - last_change > stall_s \
                else f"stopped: still running after {limit_s:.0f} s"
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                    break
            proc.wait()
    stdout, stderr = (open(p).read() for p in paths)
    return proc.returncode, stdout, stderr + (f"\n[test] {stopped}" if stopped else "")


def _tree_state(root: str) -> tuple:
    """Every file under `root` with its size and modification time (what changes while the scenario makes progress)."""
    state = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.stat(os.path.join(dirpath, name))
                state.append((dirpath, name, st.st_size, st.st_mtime_ns))
    return tuple(sorted(state))


def test_training_across_nodes_survives_losing_a_node(tmp_path):
    # Cluster() records its address in $RAY_TMPDIR/ray/ray_current_cluster, where a bare `ray.init()`
    # looks: a private RAY_TMPDIR keeps other Ray users on the machine from ever finding this cluster
    ray_tmp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")
    os.makedirs(os.path.join(ray_tmp, "ray"))
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    # a token of its own: Ray enables token auth when the user has one, and this cluster must not need it
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), DS_ACCELERATOR="cpu",
               # a loaded 2-core machine can take longer than Train's default 60 s to restart the group
               RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300", RAY_TMPDIR=ray_tmp,
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    try:
        for attempt in range(2):  # bounded: a cluster whose start Ray gave up on is started once more
            scenario_dir = tmp_path / f"attempt{attempt}"
            scenario_dir.mkdir()
            rc, stdout, stderr = run_while_it_progresses([sys.executable, os.path.abspath(__file__), str(scenario_dir)],
                                                         env, scenario_dir)
            if rc == 0 or not any(s in stderr for s in RAY_START_TIMED_OUT):
                break
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in stdout.splitlines() if line.startswith("{\"scenario\"")]
    assert rc == 0 and lines, f"rc {rc}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    out = json.loads(lines[-1])["scenario"]
    print(json.dumps(out))  # shown by pytest -rA / on failure
    assert out["error"] is None, out
    assert out["node_removed"], out
    # two of the three train nodes had handed their single train_node slot to a worker: spread over nodes
    assert sorted(out["train_node_free_before"].values()) == [0.0, 0.0, 1.0], out
    assert "checkpoint_00000002" in out["checkpoints_before"] and out["registered_before"], out
    # restarted from the step-2 checkpoint on the surviving + replacement node, ended at exactly max_steps
    assert out["step"] == 4 and out["state_step"] == 4, out
    assert out["start_steps"] == [0, 2], out
    assert out["export_has_config"], out
    # across the failure: every record of the epoch trained exactly once (none lost, none twice)
    assert out["trained_keys"] == out["record_keys"], out


if __name__ == "__main__":
    print(json.dumps({"scenario": run_scenario(sys.argv[1])}), flush=True)
