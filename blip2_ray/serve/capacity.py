"""Deploy-time fit check: does the caption model, in the serving dtype and split over `gpus_per_replica`
GPUs, fit the memory of the cluster's GPUs (or, on CPU, a node's memory)? One UserError naming the
numbers when it does not, before any replica starts (a replica that runs out of memory at load time
would only be restarted by Serve, again and again).

The model's size comes from its `config.json` alone (built on the meta device: nothing is read); the
cluster's from `ray.nodes()` and, for the GPUs' memory, `gpu_memory_gib` or `nvidia-smi` on each GPU
node. Needed per GPU = the weights that GPU holds (the same `layer_device_map` the replica uses) +
`WORKING_GIB` for the CUDA context, activations and a batch's KV cache.
"""

from __future__ import annotations

import logging
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from blip2_ray.errors import UserError
from blip2_ray.model.vision import DTYPES
from blip2_ray.serve.config import ServeConfig
from blip2_ray.serve.placement import bytes_per_device, layer_device_map, tensor_bytes

log = logging.getLogger(__name__)
GiB = 2**30
WORKING_GIB = 1.0  # CUDA context + activations + KV cache of a batch, on top of the weights
LOAD_PEAK = 1.05  # host memory while loading / the weights (make bench-serve-scale measures it)
_FLOAT32_PARTS = ("query_tokens", "qformer", "language_projection")  # the loader keeps them in float32


@dataclass
class NodeView:
    """What a fit check needs of one alive node: CPUs, GPUs, Ray's `memory` resource and one GPU's memory."""

    cpus: float
    gpus: float
    memory_bytes: float
    gpu_memory_bytes: float | None = None


def caption_bytes_per_device(model_dir: str, dtype: str, n_devices: int) -> list[int]:
    """Weight bytes each of the replica's `n_devices` devices holds for the stage-2 model in `model_dir`
    (ViT + LLM in `dtype`, the Q-Former, queries and projection in float32; the rest on device 0)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from blip2_ray.weights.local_files import read_json
    from blip2_ray.weights.native_format import meta_copy_of_fields, mirrored_hf_config, vision_fields
    from blip2_ray.weights.weight_sources import is_native_config

    config_file = Path(model_dir) / "config.json"
    data = read_json(config_file, "model config") if config_file.is_file() else {}
    if is_native_config(data):  # a CLIP ViT-L model in our own format: its CLIP tower in the HF ViT's place
        cls, config = mirrored_hf_config(model_dir, data)
        with torch.device("meta"):
            hf = cls(config)
        hf.vision_model = meta_copy_of_fields(vision_fields(data))
    else:
        try:
            config = Blip2Config.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"model {model_dir!r} holds no BLIP-2 config.json ({e.__class__.__name__})") from None
        with torch.device("meta"):
            hf = Blip2ForConditionalGeneration(config)
    target = DTYPES[dtype]
    first = sum(tensor_bytes(getattr(hf, name), torch.float32) if name in _FLOAT32_PARTS else
                tensor_bytes(getattr(hf, name), target)
                for name in ("vision_model", "qformer", "language_projection"))
    first += hf.query_tokens.numel() * 4
    lm = hf.language_model
    if n_devices <= 1:
        return [first + tensor_bytes(lm, target)]
    devices = list(range(n_devices))
    per = bytes_per_device(lm, layer_device_map(lm, devices, first, target), target)
    return [per.get(d, 0) + (first if d == 0 else 0) for d in devices]


def _nvidia_smi_min_mib() -> float:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return min(float(x) for x in out.split())


def cluster_nodes(gpu_memory_gib: float | None) -> list[NodeView] | None:
    """The alive nodes of the connected Ray cluster (None: Ray is not initialised here, nothing to check).

    A GPU node's GPU memory is `gpu_memory_gib` when given, else read with `nvidia-smi` on that node (a
    zero-resource task pinned to it); a node where that fails is a UserError naming `gpu_memory_gib`.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        return None
    views, probes = [], []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        view = NodeView(res.get("CPU", 0.0), res.get("GPU", 0.0), res.get("memory", 0.0))
        if view.gpus and gpu_memory_gib is not None:
            view.gpu_memory_bytes = gpu_memory_gib * GiB
        elif view.gpus:
            strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            task = ray.remote(num_cpus=0)(_nvidia_smi_min_mib).options(scheduling_strategy=strategy)
            probes.append((view, task.remote()))
        views.append(view)
    for view, ref in probes:
        try:
            view.gpu_memory_bytes = ray.get(ref, timeout=60) * 2**20
        except Exception as e:  # noqa: BLE001 - any failure means: ask the user for the number
            raise UserError(f"could not read a GPU node's GPU memory with nvidia-smi ({e.__class__.__name__}); "
                            f"set gpu_memory_gib in the serve config") from None
    return views


def check_caption_fit(cfg: ServeConfig, nodes: list[NodeView]) -> None:
    """UserError unless some node can hold one caption replica: with device cuda, `gpus_per_replica` GPUs
    each with the memory its share of the weights needs; on CPU, the memory the loading peak needs."""
    if not cfg.model:
        return
    gib = lambda b: f"{b / GiB:.1f} GiB"  # noqa: E731
    if cfg.device == "cuda":
        n = max(1, int(cfg.gpus_per_replica))
        per = caption_bytes_per_device(cfg.model, cfg.dtype, n)
        needed = max(per) + WORKING_GIB * GiB
        gpu_nodes = [v for v in nodes if v.gpus >= cfg.gpus_per_replica]
        if not gpu_nodes:
            most = max((v.gpus for v in nodes), default=0)
            raise UserError(f"gpus_per_replica {cfg.gpus_per_replica:g} but no node of the cluster has that many "
                            f"GPUs (the most is {most:g}); lower gpus_per_replica or add GPU nodes")
        # a fraction of a GPU is a share of its memory; a whole GPU or more is whole GPUs
        share = min(cfg.gpus_per_replica, 1.0)
        available = max(v.gpu_memory_bytes or 0 for v in gpu_nodes) * share
        if needed > available:
            layout = " + ".join(gib(b) for b in per)
            more = max(n + 1, math.ceil(sum(per) / max(available - WORKING_GIB * GiB, 1)))
            raise UserError(
                f"model {Path(cfg.model).name!r} in {cfg.dtype} does not fit: it needs {gib(needed)} per GPU "
                f"({layout} of weights over {n} GPU(s) + {WORKING_GIB:g} GiB working memory) but the cluster's "
                f"GPUs have {gib(available)} each" + (f" ({share:g} of a GPU)" if share < 1 else "")
                + f"; raise gpus_per_replica (about {more} would fit), use a smaller dtype, or larger GPUs")
        return
    needed = sum(caption_bytes_per_device(cfg.model, cfg.dtype, 1)) * LOAD_PEAK + WORKING_GIB * GiB
    available = max((v.memory_bytes for v in nodes if v.cpus >= cfg.cpus_per_replica), default=0)
    if needed > available:
        raise UserError(f"model {Path(cfg.model).name!r} in {cfg.dtype} does not fit on CPU: a replica needs "
                        f"{gib(needed)} of host memory but the largest node has {gib(available)} (Ray's memory "
                        f"resource); use a smaller dtype (bfloat16), a larger node, or device cuda")


def check_deployment_fits(cfg: ServeConfig) -> None:
    """The fit check against the connected cluster (skipped, with a log line, when Ray is not initialised)."""
    if not cfg.model:
        return
    nodes = cluster_nodes(cfg.gpu_memory_gib)
    if nodes is None:
        log.info("Ray is not initialised here: the caption model's memory fit is not checked before deploying")
        return
    check_caption_fit(cfg, nodes)
