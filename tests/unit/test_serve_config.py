"""ServeConfig: strict validation, the serve.yaml args, and the job's flag/--set precedence (no Ray)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from blip2_ray.config import ConfigError, from_dict
from blip2_ray.serve.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def dirs(tmp_path):
    """A caption and a retrieval model directory as far as the config and the app's kind check read them
    (config.json and the file names; test_serve_model_kinds checks real exports)."""
    for name, arch in (("m", "Blip2ForConditionalGeneration"), ("r", "Blip2ForImageTextRetrieval")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "blip-2", "architectures": [arch]}))
        for f in ("model.safetensors", "tokenizer.json", "preprocessor_config.json"):
            (tmp_path / name / f).write_text("")
    return str(tmp_path / "m"), str(tmp_path / "r")


def test_defaults_and_nested(dirs):
    cfg = from_dict(ServeConfig, {"model": dirs[0], "autoscaling": {"max_replicas": 3}, "generation": {"num_beams": 2}})
    assert cfg.autoscaling.max_replicas == 3 and cfg.generation.num_beams == 2
    assert cfg.caption_model_name == "m" and cfg.retrieval_model is None and cfg.retrieval_name is None


@pytest.mark.parametrize("data,needle", [
    ({"modle": "x"}, "unknown config key 'modle'"),
    ({"generation": {"beams": 2}}, "unknown config key 'generation.beams'"),
    ({"port": "eighty"}, "port"),
    ({"device": "tpu"}, "device"),
    ({"max_batch_size": 16, "max_ongoing_requests": 8}, "max_ongoing_requests"),
    ({"max_queued_requests": 0}, "max_queued_requests"),
    ({"allowed_image_url_prefixes": ["ftp://x"]}, "allowed_image_url_prefixes"),
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas"),
    ({"ingress": {"num_replicas": 0}}, "ingress: num_replicas"),
    ({"ingress": {"cpus": 2}}, "unknown config key 'ingress.cpus'"),
    ({"retrieval": {"max_batch_size": 64, "max_ongoing_requests": 32}}, "retrieval: max_ongoing_requests"),
    ({"retrieval": {"gpus_per_replica": -0.5}}, "retrieval: gpus_per_replica must be >= 0, got -0.5"),
    ({"decode_capture": "cuda_graphs"}, "needs device cuda"),
    ({"decode_capture": "jit"}, "decode_capture"),
    ({"llm_quantization": "int4"}, "llm_quantization"),
    ({"max_seq_len": 1}, "max_seq_len"),
])
def test_rejects_bad_values(dirs, data, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        from_dict(ServeConfig, {"model": dirs[0], **data})


def test_needs_a_model_and_existing_dirs(tmp_path):
    with pytest.raises(ConfigError, match="at least one"):
        from_dict(ServeConfig, {})
    with pytest.raises(ConfigError, match="not a local directory"):
        from_dict(ServeConfig, {"model": str(tmp_path / "absent")})


def test_serve_yaml_args_validate(dirs):
    doc = yaml.safe_load((ROOT / "jobs/configs/serve.yaml").read_text())
    app = doc["applications"][0]
    assert app["import_path"] == "blip2_ray.serve.app:app_builder"
    args = {**app["args"], "model": dirs[0], "retrieval_model": dirs[1]}
    cfg = from_dict(ServeConfig, args)
    assert cfg.device == "cuda" and cfg.max_batch_size <= cfg.max_ongoing_requests


def _serve_job():
    spec = importlib.util.spec_from_file_location("serve_job", ROOT / "jobs/serve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_job_flags_and_sets(dirs, tmp_path):
    job = _serve_job()
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"port": 9000, "max_batch_size": 4}))
    args = job.parse_args(["--model", dirs[0], "--config", str(cfg_file), "--port", "9100",
                           "--set", "max_batch_size=2"])
    cfg = job.load_serve_config(args)
    assert (cfg.model, cfg.port, cfg.max_batch_size) == (dirs[0], 9100, 2)
    with pytest.raises(ConfigError, match="unknown config key"):
        job.load_serve_config(job.parse_args(["--model", dirs[0], "--set", "nope=1"]))
    assert job.main(["--set", "port=1"]) == 2  # no model: one sentence, exit 2, Ray never started


def test_app_builder_validates_args_strictly(dirs):
    from ray.serve import Application

    from blip2_ray.serve.app import app_builder

    assert isinstance(app_builder({"model": dirs[0], "retrieval_model": dirs[1]}), Application)
    with pytest.raises(ConfigError, match="unknown config key 'max_batch'"):
        app_builder({"model": dirs[0], "max_batch": 4})


def test_build_app_takes_each_deployment_resources_from_the_config(dirs, monkeypatch):
    from blip2_ray.serve import capacity
    from blip2_ray.serve.app import build_app

    # this test is about the deployments' options, not the fit check (test_serve_placement has those): no
    # cluster view, also when an earlier test of the session left a CPU-only Ray connected in this process
    monkeypatch.setattr(capacity, "cluster_nodes", lambda gpu_memory_gib: None)

    cfg = from_dict(ServeConfig, {
        "model": dirs[0], "retrieval_model": dirs[1], "device": "cuda", "gpus_per_replica": 0.75, "num_replicas": 2,
        "ingress": {"num_replicas": 3, "cpus_per_replica": 2.0, "max_ongoing_requests": 500},
        "retrieval": {"gpus_per_replica": 0.25, "cpus_per_replica": 0.5, "autoscaling": {"max_replicas": 4}},
    })
    ingress = build_app(cfg)._bound_deployment
    captioner, retrieval = (a._bound_deployment for a in ingress.init_args[1:3])
    assert ingress.num_replicas == 3 and ingress.ray_actor_options["num_cpus"] == 2.0
    assert ingress.max_ongoing_requests == 500
    assert captioner.num_replicas == 2 and captioner.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.75}
    assert retrieval.ray_actor_options == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert retrieval._deployment_config.autoscaling_config.max_replicas == 4
