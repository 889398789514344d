"""Can the cluster run a job? Its Train workers and at least one Ray Data decode task, at the same time.

Ray Train reserves scaling.cpus_per_worker (and one GPU with use_gpu) per worker for the whole run; the
decode tasks need data.num_cpus_per_decode_task each from what is left. When no decode task fits, the
workers wait for their first batch forever (Ray Data only logs "Cluster resources are not enough to run
any task"). `check_cluster` fails in seconds instead, naming the numbers and the values that would fit.

An error rather than shrinking the workers' reservation to fit: a reservation is the user's promise to
the scheduler (the GPU configs keep 8 CPUs per worker for the collate and copy threads); the message gives
the largest values that fit, and the shipped tiny configs are sized for a 2-CPU machine.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from blip2_ray.errors import UserError
from blip2_ray.train.config import PretrainConfig

_EPS = 1e-6  # Ray's resource granularity is 1e-4


@dataclass
class ResourcePlan:
    workers: int
    worker: dict[str, float]  # one Train worker's bundle: {"CPU": ...} (+ {"GPU": 1})
    decode: dict[str, float]  # one decode task: {"CPU": ...}

    @classmethod
    def of(cls, cfg: PretrainConfig) -> ResourcePlan:
        worker = {"CPU": cfg.scaling.cpus_per_worker}
        if cfg.scaling.use_gpu:
            worker["GPU"] = 1.0
        return cls(cfg.scaling.num_workers, worker, {"CPU": cfg.data.num_cpus_per_decode_task})

    def bundles(self) -> list[dict[str, float]]:
        return [dict(self.worker) for _ in range(self.workers)] + [dict(self.decode)]


def _workers_on(node: dict[str, float], worker: dict[str, float], taken: dict[str, float], cap: int) -> int:
    k = cap
    for resource, amount in worker.items():
        if amount > 0:
            k = min(k, math.floor((node.get(resource, 0.0) - taken.get(resource, 0.0) + _EPS) / amount))
    return max(k, 0)


def fits(nodes: list[dict[str, float]], plan: ResourcePlan) -> bool:
    """True if the workers and one decode task can be placed on `nodes` (their total resources), each on one node."""
    base = [_workers_on(n, plan.worker, {}, plan.workers) for n in nodes]
    for i, node in enumerate(nodes):
        if all(node.get(r, 0.0) + _EPS >= a for r, a in plan.decode.items()):
            beside_decode = _workers_on(node, plan.worker, plan.decode, plan.workers)
            if sum(base) - base[i] + beside_decode >= plan.workers:
                return True
    return False


def _largest(fit, hi: float, steps: int = 30) -> float | None:
    """The largest x in [0.01, hi] with fit(x) (fit monotone decreasing in x), to 2 decimals; None if none."""
    lo_ok, lo, top = None, 0.0, hi
    if fit(hi):
        return hi
    for _ in range(steps):
        mid = (lo + top) / 2
        if fit(mid):
            lo_ok, lo = mid, mid
        else:
            top = mid
    if lo_ok is None:
        return None
    return next((c for c in (round(lo_ok, 2), math.floor(lo_ok * 100) / 100) if c >= 0.01 and fit(c)), None)


def fix_hint(nodes: list[dict[str, float]], plan: ResourcePlan) -> str:
    """The config changes (each alone) that would make `plan` fit `nodes`."""
    out = []
    cpu = _largest(lambda x: fits(nodes, ResourcePlan(plan.workers, {**plan.worker, "CPU": x}, plan.decode)),
                   plan.worker["CPU"])
    if cpu is not None:
        out.append(f"scaling.cpus_per_worker={cpu:g}")
    dec = _largest(lambda x: fits(nodes, ResourcePlan(plan.workers, plan.worker, {"CPU": x})), plan.decode["CPU"])
    if dec is not None:
        out.append(f"data.num_cpus_per_decode_task={dec:g}")
    workers = next((w for w in range(plan.workers - 1, 0, -1)
                    if fits(nodes, ResourcePlan(w, plan.worker, plan.decode))), None)
    if workers is not None:
        out.append(f"scaling.num_workers={workers}")
    return ("set " + " or ".join(out) + ", or add nodes") if out else "add nodes"


def describe(nodes: list[dict[str, float]]) -> str:
    cpus = [n.get("CPU", 0.0) for n in nodes]
    text = f"{sum(cpus):g} CPUs on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"
    if len(nodes) > 1:
        text += f" (at most {max(cpus):g} on one)"
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    return text + f" and {gpus:g} GPUs"


def plan_error(nodes: list[dict[str, float]], plan: ResourcePlan, waited_s: float = 0.0) -> str:
    gpu = " and 1 GPU" if plan.worker.get("GPU") else ""
    waited = f" after waiting {waited_s:.0f} s (scaling.resource_wait_s) for it to grow" if waited_s else ""
    return (f"the cluster cannot run {plan.workers} training workers (scaling.cpus_per_worker={plan.worker['CPU']:g} "
            f"CPU{gpu} each) and a data decode task (data.num_cpus_per_decode_task={plan.decode['CPU']:g} CPU) at "
            f"the same time: it has {describe(nodes)}{waited}; {fix_hint(nodes, plan)}")


def alive_nodes() -> list[dict[str, float]]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def check_cluster(cfg: PretrainConfig, poll_s: float = 5.0) -> None:
    """UserError unless the connected cluster can hold the run's workers and a decode task together.

    With scaling.resource_wait_s > 0 the autoscaler is asked for the missing nodes and the check waits
    up to that long for them.
    """
    plan = ResourcePlan.of(cfg)
    nodes = alive_nodes()
    if fits(nodes, plan):
        return
    wait_s = cfg.scaling.resource_wait_s
    if wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        print(f"waiting up to {wait_s:g} s for the cluster to hold {plan.workers} workers and a decode task "
              f"(it has {describe(nodes)})", flush=True)
        request_resources(bundles=plan.bundles())
        start = time.monotonic()
        try:
            while time.monotonic() - start < wait_s:
                time.sleep(poll_s)
                nodes = alive_nodes()
                if fits(nodes, plan):
                    return
        finally:
            request_resources(bundles=[])  # Ray Train's own request takes over from here
    raise UserError(plan_error(nodes, plan, wait_s))
