"""cluster.yaml passes Ray's own validation, is safe to start, and its node types fit the shipped jobs."""

from __future__ import annotations

import glob
import math
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_validates_the_cluster_config(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster))  # raises on unknown keys, bad head type, worker sums


def test_head_runs_no_work_and_dashboard_is_local_only(cluster):
    head = cluster["available_node_types"][cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and "GPU" not in head["resources"]
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in yaml.safe_dump(cluster)


def test_no_credentials_and_an_instance_profile_everywhere(cluster):
    text = (ROOT / "cluster.yaml").read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AWS_SECRET", "AKIA"):
        assert secret.lower() not in text.lower()
    for name, node in cluster["available_node_types"].items():
        assert "IamInstanceProfile" in node["node_config"], name


def test_image_and_project_install(cluster):
    image = cluster["docker"]["image"]
    assert image.startswith("rayproject/ray:2.60.0-") and image.endswith("-gpu")
    mount = cluster["file_mounts"]
    assert mount.get("/home/ray/blip2_ray") == "."  # the checked-out version travels
    assert any("pip install" in c and "/home/ray/blip2_ray" in c for c in cluster["setup_commands"])


def _node_types(cluster, resource):
    return {n: t for n, t in cluster["available_node_types"].items() if t.get("resources", {}).get(resource)}


def test_training_configs_fit_the_gpu_node_types(cluster):
    from blip2_ray.config import load_config
    from blip2_ray.train.config import PretrainConfig

    train_types = _node_types(cluster, "train_node")
    assert train_types
    configs = [p for p in sorted(glob.glob(str(ROOT / "jobs/configs/stage*_vit*.yaml")))]
    assert configs, "no real-size training configs shipped"
    for path in configs:
        cfg = load_config(PretrainConfig, path)
        assert cfg.scaling.use_gpu, path
        # some train node type holds the whole run: enough GPUs over its max_workers, and CPUs per GPU
        fits = []
        for t in train_types.values():
            gpus, cpus = t["resources"]["GPU"], t["resources"]["CPU"]
            nodes_needed = math.ceil(cfg.scaling.num_workers / gpus)
            cpu_ok = min(gpus, cfg.scaling.num_workers) * cfg.scaling.cpus_per_worker <= cpus
            fits.append(nodes_needed <= t["max_workers"] and cpu_ok)
        assert any(fits), (f"{path}: {cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker} CPUs fit "
                           f"no train node type")


def test_serve_config_fits_the_serve_node_type(cluster):
    serve = yaml.safe_load((ROOT / "jobs/configs/serve.yaml").read_text())
    args = serve["applications"][0]["args"]
    types = _node_types(cluster, "serve_node")
    assert types
    t = next(iter(types.values()))
    per_node = math.floor(t["resources"]["GPU"] / args["gpus_per_replica"])
    assert per_node >= 1 and args["cpus_per_replica"] <= t["resources"]["CPU"]
    assert args["num_replicas"] <= per_node * t["max_workers"]
    # one replica of each deployment (caption, retrieval, the ingress replicas) shares one serve node
    r, i = args["retrieval"], args["ingress"]
    assert args["gpus_per_replica"] + r["gpus_per_replica"] <= t["resources"]["GPU"]
    cpus = args["cpus_per_replica"] + r["cpus_per_replica"] + i["num_replicas"] * i["cpus_per_replica"]
    assert cpus <= t["resources"]["CPU"]


def test_data_nodes_exist_for_decoding(cluster):
    data = _node_types(cluster, "data_node")
    assert data and all("GPU" not in t["resources"] for t in data.values())
    assert sum(t["max_workers"] for t in data.values()) >= 1


def test_every_node_keeps_idle_workers_as_a_job_s_own_instance_does(cluster):
    from blip2_ray.runtime.cluster import worker_pool_env

    for commands in (cluster["head_start_ray_commands"], cluster["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert all(f"{k}={v} ray start" in start for k, v in worker_pool_env().items()), start
