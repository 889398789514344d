"""The actor pool of a Ray Data batch job (evaluation, CapFilt): its config section, its Ray
resources, and the device and dtype a model runs in inside one of its actors."""

from __future__ import annotations

from dataclasses import dataclass

from blip2_ray.config_fields import doc


@dataclass
class ComputeConfig:
    num_actors: int = doc("actors in the pool (one GPU each where GPUs exist)", 2)
    num_gpus_per_actor: float | None = doc("GPUs per actor; null: 1 if the cluster has GPUs, else 0", None)
    num_cpus_per_actor: float = doc("CPUs reserved per actor", 1.0)
    batch_size: int = doc("images (or texts) per model call", 32)

    def validate(self) -> None:
        if self.num_actors < 1 or self.batch_size < 1:
            raise ValueError("num_actors and batch_size must be >= 1")


def actor_pool(compute: ComputeConfig, num_items: int) -> dict:
    """`map_batches` keywords for the pool: `compute` (an ActorPoolStrategy of num_actors, never more
    actors than `num_items` and at least one), `num_gpus`, `num_cpus` (per actor)."""
    import ray

    gpus = compute.num_gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    return {"compute": ray.data.ActorPoolStrategy(size=max(1, min(compute.num_actors, num_items))),
            "num_gpus": gpus, "num_cpus": compute.num_cpus_per_actor}


def device_and_dtype(dtype: str) -> tuple[str, str]:
    """(device, dtype name) for a model in this process: "cuda" where a GPU is visible, else "cpu";
    `dtype` as given ("float32", "float16", "bfloat16"), "auto" meaning float16 on a GPU, float32 on CPU."""
    import torch

    cuda = torch.cuda.is_available()
    if dtype == "auto":
        return ("cuda", "float16") if cuda else ("cpu", "float32")
    return ("cuda" if cuda else "cpu"), dtype
