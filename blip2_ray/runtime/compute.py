"""The actor pool of a batch job (evaluation, CapFilt, the index): its config section, its Ray resources,
`ModelPool` (actors that keep their model for every pass of a job), and the device and dtype a model runs
in inside one of its actors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

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


def _pool_size(compute: ComputeConfig, num_items: int) -> int:
    return max(1, min(compute.num_actors, num_items))


def _gpus_per_actor(compute: ComputeConfig) -> float:
    import ray

    if compute.num_gpus_per_actor is not None:
        return compute.num_gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


def actor_pool(compute: ComputeConfig, num_items: int) -> dict:
    """`map_batches` keywords for the pool: `compute` (an ActorPoolStrategy of num_actors, never more
    actors than `num_items` and at least one), `num_gpus`, `num_cpus` (per actor)."""
    import ray

    return {"compute": ray.data.ActorPoolStrategy(size=_pool_size(compute, num_items)),
            "num_gpus": _gpus_per_actor(compute), "num_cpus": compute.num_cpus_per_actor}


def columns(rows: list[dict]) -> dict[str, np.ndarray]:
    """Rows as a numpy batch, as Ray Data's `batch_format="numpy"` gives it: numbers as number arrays,
    anything else (bytes, text, arrays) as object arrays, each value unchanged."""
    out = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values):
            out[key] = np.asarray(values)
        else:
            out[key] = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):  # one by one: no value (an array) is ever unpacked into the column
                out[key][i] = v
    return out


class ModelPool:
    """Ray actors of `actor` (a class whose instances load a model and map a numpy batch with
    `__call__(batch, **kwargs)`), built once and kept for every pass of a job: a job that maps its rows
    in several passes (retrieval: texts, images, then ITM) loads its model once per actor, where a Ray
    Data actor pool builds its actors again for every dataset. Never more actors than `num_items`.
    Use it as a context manager: leaving it frees the actors and their resources.

    Batches go to whichever actor is free; a UserError raised in an actor (its constructor included)
    reaches the driver as itself inside `reraise_user_errors()`."""

    def __init__(self, actor: type, compute: ComputeConfig, num_items: int, **constructor_kwargs):
        import ray

        from blip2_ray.runtime.user_errors import report_user_errors

        class Pooled(report_user_errors(actor)):
            def run(self, batch: dict, kwargs: dict) -> dict:
                return self(batch, **kwargs)

        Pooled.__name__ = actor.__name__
        remote = ray.remote(num_cpus=compute.num_cpus_per_actor, num_gpus=_gpus_per_actor(compute))(Pooled)
        self.actors = [remote.remote(**constructor_kwargs) for _ in range(_pool_size(compute, num_items))]

    def map(self, rows: list[dict], batch_size: int, **kwargs) -> Iterator[dict]:
        """The actors' output for `rows`, `batch_size` rows per call (`__call__(batch, **kwargs)`), in the
        order the calls finish."""
        from ray.util import ActorPool

        batches = (columns(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size))
        yield from ActorPool(self.actors).map_unordered(lambda a, b: a.run.remote(b, kwargs), batches)

    def __enter__(self) -> ModelPool:
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def device_and_dtype(dtype: str) -> tuple[str, str]:
    """(device, dtype name) for a model in this process: "cuda" where a GPU is visible, else "cpu";
    `dtype` as given ("float32", "float16", "bfloat16"), "auto" meaning float16 on a GPU, float32 on CPU."""
    import torch

    cuda = torch.cuda.is_available()
    if dtype == "auto":
        return ("cuda", "float16") if cuda else ("cpu", "float32")
    return ("cuda" if cuda else "cpu"), dtype
