"""Job submission for real: a local Ray head of our own, jobs sent to it as `ray job submit` sends them.

The head is `ray start --head --block` in a child process group that this module owns (every port
chosen here, its own temp dir, bound to 127.0.0.1) and is stopped by signalling that group: never
`ray stop`, which would kill every Ray instance of the user on the machine. It does not use the
`ray_session` fixture: the jobs' drivers join this head, not the test process's Ray.

  1. a config with a misspelt key fails fast, and the one-sentence error is in the job's logs;
  2. stage 1 on the tiny preset with a CLIP ViT-L image encoder (2 steps, working_dir upload of the repository)
     SUCCEEDS, writes a checkpoint and an export in our own format (no HF class holds a CLIP ViT-L);
  3. retrieval evaluation of that export SUCCEEDS and writes its report.

A submission the job server refuses because it is not ready yet ("No available agent to submit job, please try
again later", seen on a busy machine) is retried, for a bounded time.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from blip2_ray.runtime.cluster import free_ports, worker_pool_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the working_dir upload is size-limited: ship the code, not the environment or outputs. Patterns match
# like .gitignore: outputs are anchored at the root ("data" alone also dropped blip2_ray/data/, and the
# jobs then imported that package from wherever else Python found it)
EXCLUDES = [".venv", ".git", ".whl", ".cache", ".hypothesis", ".pytest_cache", ".ruff_cache", "/demo_out", "/runs",
            "/build", "/data", "/outputs", "**/__pycache__"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _ray_cli() -> str:
    cli = os.path.join(os.path.dirname(sys.executable), "ray")
    return cli if os.path.exists(cli) else "ray"


class HeadDidNotStart(RuntimeError):
    """`ray start` gave up (its raylet has 30 s to register, which a loaded machine can exceed): start again."""


def _wait_for_job_server(url: str, headers: dict, proc: subprocess.Popen, log: str, timeout: float = 300) -> None:
    """Ready: `ray start --block` said "Ray runtime started." (its raylet registered) and the job server answers."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise HeadDidNotStart(f"ray start exited with {proc.returncode}:\n{open(log).read()[-3000:]}")
        if "Ray runtime started" in open(log).read():
            try:
                req = urllib.request.Request(f"{url}/api/version", headers=headers)
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
        time.sleep(1)
    raise RuntimeError(f"the job server at {url} did not come up in {timeout} s:\n{open(log).read()[-3000:]}")


def _stop_group(proc: subprocess.Popen, timeout: float = 5) -> None:
    """SIGTERM the head's process group (our own, from start_new_session), SIGKILL what is left after `timeout`.

    Its raylet, GCS and dashboard end on SIGTERM; `ray start --block` itself outlives it (measured: still there
    after 30 s), so a longer wait only idles."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A Ray head on 127.0.0.1 with its own ports, temp dir and auth token; yields (job server URL, headers).

    Ray 2.5x+ turns token authentication on when the user has a token (~/.ray/auth_token); this head
    gets a fresh token of its own instead, so the test neither reads nor depends on the user's.
    """
    tmp = tmp_path_factory.mktemp("head")
    for attempt in range(3):  # bounded: a head whose `ray start` gave up is started again, twice at most
        head = _head(tmp, attempt)
        try:
            url_headers = head.__enter__()
            break
        except HeadDidNotStart:
            if attempt == 2:
                raise
    try:
        yield url_headers
    finally:
        head.__exit__(None, None, None)


@contextlib.contextmanager
def _head(tmp, attempt: int):
    # short path: Ray's unix sockets live under the temp dir and have a ~107-byte limit
    temp_dir = os.path.join("/tmp", f"rayjobs_{os.getpid()}_{attempt}")
    names = ["--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
             "--node-manager-port", "--object-manager-port"]
    ports = dict(zip(names, free_ports(len(names))))  # distinct: Ray refuses one port for two components
    dashboard_port = ports["--dashboard-port"]
    cmd = [_ray_cli(), "start", "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
           f"--temp-dir={temp_dir}", "--num-cpus=4", "--num-gpus=0", "--include-dashboard=true",
           "--object-store-memory=500000000", "--disable-usage-stats", "--block"]
    cmd += [f"{k}={v}" for k, v in ports.items()]
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    token = secrets.token_hex(32)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    # the jobs' drivers and workers inherit the head's environment
    # a loaded machine (the suite runs two files at once) can take longer than Ray's 60 s to start the dashboard
    # (seen: `ray start` gave up twice); unbuffered, so that the log shows how far `ray start` got
    env.update(RAY_DASHBOARD_STARTUP_TIMEOUT_S="240", PYTHONUNBUFFERED="1")
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               BLIP2_RAY_CACHE=os.environ["BLIP2_RAY_CACHE"], **worker_pool_env(),
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    log = str(tmp / f"head{attempt}.log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard_port}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        _wait_for_job_server(url, headers, proc, log)
        yield url, headers
    finally:
        _stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def client(ray_head):
    from ray.job_submission import JobSubmissionClient

    url, headers = ray_head
    return JobSubmissionClient(url, headers=headers)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from blip2_ray.fixtures.sample import make_sample_shards

    d = tmp_path_factory.mktemp("shapes")
    make_sample_shards(str(d), num=32, shards=2, image_size=32, seed=0)
    return str(d)


NOT_READY = ("No available agent", "try again later", "not ready")


def submit(client, args: list[str], timeout: float = 120) -> str:
    """`ray job submit --working-dir . -- python ARGS`, with this venv's python; a "not ready" refusal of the
    job server is retried until `timeout`."""
    entrypoint = shlex.join([sys.executable, *args])
    deadline = time.time() + timeout
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": ROOT, "excludes": EXCLUDES})
        except RuntimeError as e:
            if not any(s in str(e) for s in NOT_READY) or time.time() > deadline:
                raise
            time.sleep(2)


def wait(client, job_id: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(1)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} not finished after {timeout} s; logs:\n{client.get_job_logs(job_id)[-4000:]}")


def test_bad_config_fails_fast_with_one_clear_sentence(client, tmp_path):
    job = submit(client, ["jobs/pretrain.py", "--config", "jobs/configs/stage1_tiny.yaml",
                          "--set", "train.max_stepz=3", "--set", f"storage_path={tmp_path}"])
    status = wait(client, job, timeout=180)  # it fails at the config, before Ray: bounded, not timed
    logs = client.get_job_logs(job)
    assert status == "FAILED", logs
    assert "unknown config key 'train.max_stepz'" in logs and "max_steps" in logs, logs
    # the user error is one sentence, not a Ray or Python traceback
    assert "Traceback" not in logs, logs


@pytest.fixture(scope="module")
def pretrain_job(client, shards, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    sets = {
        "run_name": "jobs_s1", "storage_path": f"{tmp}/runs", "output_dir": f"{tmp}/export",
        "data.train": f"[{shards}]", "data.shuffle_buffer": 16, "data.decode_batch_size": 16,
        "train.max_steps": 2, "train.global_batch_size": 8, "train.micro_batch_size": 4,
        "train.log_every": 1, "train.checkpoint_every": 2, "train.warmup_steps": 1,
        "model.vision.kind": "clip_vit_l",
    }
    args = ["jobs/pretrain.py", "--config", "jobs/configs/stage1_tiny.yaml"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    job = submit(client, args)
    status = wait(client, job, timeout=420)
    return tmp, job, status, client.get_job_logs(job)


def test_pretrain_job_succeeds_with_checkpoint_and_export(pretrain_job):
    from blip2_ray.model.vision import ClipVisionTower
    from blip2_ray.weights.hf_format import load_stage1

    tmp, _, status, logs = pretrain_job
    assert status == "SUCCEEDED", logs[-4000:]
    assert "done: run jobs_s1 step 2" in logs, logs[-4000:]
    assert logs.count("[stage1] step 2/2 ") == 1 and "TrainingReport" not in logs, logs[-4000:]  # one line each
    run_dir = tmp / "runs" / "jobs_s1"
    assert (run_dir / "checkpoint_00000002").is_dir(), sorted(os.listdir(run_dir))
    config = json.loads((tmp / "export" / "config.json").read_text())
    assert config["model_type"] == "blip2_ray" and config["architectures"] == ["Blip2ForImageTextRetrieval"]
    model, _ = load_stage1(str(tmp / "export"))
    assert isinstance(model.vision_model, ClipVisionTower) and model.query_tokens.shape[1] == 8


def test_evaluate_job_on_the_export(client, pretrain_job, shards):
    tmp, _, status, _ = pretrain_job
    if status != "SUCCEEDED":
        pytest.skip("the pre-training job failed (see the test above)")
    report = tmp / "eval" / "retrieval.json"
    job = submit(client, ["jobs/evaluate.py", "--config", "jobs/configs/eval_retrieval_tiny.yaml",
                          "--set", f"model={tmp}/export", "--set", f"test_set.shards=[{shards}]",
                          "--set", f"output={report}", "--set", "compute.num_actors=1", "--json"])
    status = wait(client, job, timeout=300)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-4000:]
    metrics = json.loads(logs.strip().splitlines()[-1])
    assert 0.0 <= metrics["itc_txt_r1"] <= 100.0  # Recall@1 in percent
    assert report.is_file() and "metrics" in json.loads(report.read_text())
