"""The Serve application: the HTTP ingress in front of the caption and retrieval model deployments.

    HTTP -> BLIP2Ingress (`ingress.py`: parsing, checks, image decode + resize to uint8; scales with
            `ingress`) -> CaptionDeployment (continuous batching, token streaming) / RetrievalDeployment
            (@serve.batch)          (`models.py`) / SearchDeployment (an image index, `search.py`)

`build_app(cfg)` composes the app, each deployment's replicas and resources from its own config keys;
`app_builder(args)` is the `import_path` for `serve run`/`serve deploy`.
"""

from __future__ import annotations

import os

from ray import serve

from blip2_ray.config import from_dict, to_dict
from blip2_ray.serve.capacity import check_deployment_fits
from blip2_ray.serve.config import AutoscalingSection, ServeConfig
from blip2_ray.serve.ingress import BLIP2Ingress, api
from blip2_ray.serve.model_kinds import check_servable
from blip2_ray.serve.models import CaptionDeployment, RetrievalDeployment
from blip2_ray.serve.search import SearchDeployment


def _replicas(num_replicas: int, autoscaling: AutoscalingSection | None) -> dict:
    if autoscaling is None:
        return {"num_replicas": num_replicas}
    a = autoscaling
    return {"autoscaling_config": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                   "target_ongoing_requests": a.target_ongoing_requests}}


def _actor(cfg: ServeConfig, cpus: float, gpus: float) -> dict:
    return {"num_cpus": cpus, **({"num_gpus": gpus} if cfg.device == "cuda" else {})}


def build_app(cfg: ServeConfig, name_prefix: str = ""):
    """The Serve application for `cfg`: ingress + the model deployments whose directories are given.

    Checks first that each directory holds a model the app can serve (model_kinds.py), that the caption
    model fits the connected cluster's GPUs (or nodes' memory on CPU), and that a search index was built with
    the retrieval model (a UserError naming both otherwise).
    """
    check_servable(cfg)
    check_deployment_fits(cfg)
    search = _search(cfg, name_prefix) if cfg.search.index else None
    captioner = retrieval = None
    if cfg.model:
        captioner = serve.deployment(CaptionDeployment).options(
            name=f"{name_prefix}CaptionDeployment", max_ongoing_requests=cfg.max_ongoing_requests,
            max_queued_requests=cfg.max_queued_requests, health_check_timeout_s=cfg.health_check_timeout_s,
            ray_actor_options=_actor(cfg, cfg.cpus_per_replica, cfg.gpus_per_replica),
            **_replicas(cfg.num_replicas, cfg.autoscaling),
        ).bind(cfg.model, cfg.device, cfg.dtype, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.gpus_per_replica,
               max_seq_len=cfg.max_seq_len, decode_capture=cfg.decode_capture, llm_quantization=cfg.llm_quantization,
               max_pending=cfg.max_ongoing_requests)
    if cfg.retrieval_model:
        r = cfg.retrieval
        retrieval = serve.deployment(RetrievalDeployment).options(
            name=f"{name_prefix}RetrievalDeployment", max_ongoing_requests=r.max_ongoing_requests,
            max_queued_requests=r.max_queued_requests, health_check_timeout_s=cfg.health_check_timeout_s,
            ray_actor_options=_actor(cfg, r.cpus_per_replica, r.gpus_per_replica),
            **_replicas(r.num_replicas, r.autoscaling),
        ).bind(cfg.retrieval_model, cfg.device, cfg.dtype, r.max_batch_size, r.batch_wait_timeout_s)
    # The token is read where the app is built and handed to the ingress replica (its own process).
    token = os.environ.get(cfg.api_token_env) or None
    i = cfg.ingress
    return BLIP2Ingress.options(
        name=f"{name_prefix}BLIP2Ingress", max_ongoing_requests=i.max_ongoing_requests,
        ray_actor_options={"num_cpus": i.cpus_per_replica}, health_check_timeout_s=cfg.health_check_timeout_s,
        **_replicas(i.num_replicas, i.autoscaling),
    ).bind(to_dict(cfg), captioner, retrieval, token, search)


def _search(cfg: ServeConfig, name_prefix: str):
    from blip2_ray.search import store
    from blip2_ray.search.engine import index_storage_options
    from blip2_ray.search.index import FAISS_ENV

    s = cfg.search
    manifest = store.require_manifest(s.index)
    store.same_model_or_error(manifest["model"], store.model_identity(cfg.retrieval_model), s.index)
    # S3 settings and credentials resolved here and handed to the replicas, as the data pipeline does for its tasks
    s3_opts = index_storage_options(manifest)
    return serve.deployment(SearchDeployment).options(
        name=f"{name_prefix}SearchDeployment", max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests, health_check_timeout_s=cfg.health_check_timeout_s,
        ray_actor_options={**_actor(cfg, s.cpus_per_replica, s.gpus_per_replica),
                           "runtime_env": {"env_vars": FAISS_ENV}},
        **_replicas(s.num_replicas, s.autoscaling),
    ).bind(s.index, cfg.retrieval_model, cfg.device, cfg.dtype, s.query_max_tokens, s.itm_batch_size, s.nprobe,
           max(1, int(s.cpus_per_replica)), s3_opts)


def app_builder(args: dict):
    """`import_path: blip2_ray.serve.app:app_builder`; `args` is a ServeConfig mapping, checked strictly."""
    return build_app(from_dict(ServeConfig, dict(args or {})))


__all__ = ["build_app", "app_builder", "api", "BLIP2Ingress"]
