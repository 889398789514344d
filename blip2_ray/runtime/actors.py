"""The job's bookkeeping actors (skip counts, the epoch plan, the user-error box): one place creates them.

Each is a named actor created by the driver and looked up by name from Train workers and data tasks.
Two rules hold for all of them:

- the creating process keeps a handle (a named actor dies with its last handle; `release_job_actor` ends one
  whose work is over, e.g. a run's epoch plan, in a driver that goes on), and
- the actor lives on the creator's node. With the default scheduling a zero-CPU actor may land on any
  node, and on a multi-node cluster that is often a worker node; losing that node (a spot GPU node, a
  failed host) would then lose the run's bookkeeping, the one thing a worker-group restart needs.
"""

from __future__ import annotations

from typing import Any

_HELD: dict[tuple[str, str], Any] = {}


def job_actor(actor_class, name: str, namespace: str, create: bool = False):
    """The actor `name` in `namespace`: created here (on this node, handle held) with `create`, else looked up."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    key = (namespace, name)
    if create and key not in _HELD:
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        _HELD[key] = actor_class.options(name=name, namespace=namespace, get_if_exists=True,
                                         scheduling_strategy=here).remote()
    if key in _HELD:
        return _HELD[key]
    return ray.get_actor(name, namespace=namespace)


def release_job_actor(name: str, namespace: str) -> None:
    """End the actor `name` that this process created (its work is over); nothing if this process did not."""
    import ray

    handle = _HELD.pop((namespace, name), None)
    if handle is not None:
        ray.kill(handle)
