"""What one epoch of a training dataset reads: its shard visits in order, their epoch, what a resume skips.

Ray Train executes the training dataset again for every epoch (streaming_split re-runs it), so anything fixed
when the dataset is built (the file order, the seed of every crop, flip and caption draw) would repeat each
epoch. Instead the dataset's source, `EpochFiles` (data/epoch_files.py), asks an `EpochPlan` actor whenever Ray
Data plans an execution:
  - the epoch e: the visits are `epoch_file_order(seed, e)` and every row carries e, from which the decode UDF
    seeds each record (`records.record_rng(seed, e, key)`): epoch e+1 crops, flips and draws afresh;
  - on resume, the visits the checkpoint recorded as fully trained (left out: never read again) and, for each
    partly trained visit, a bitmap of its trained record numbers (read, not decoded: see pipeline._ShardToRows).
Rank 0 of the Train workers writes the plan before it iterates an epoch; streaming_split starts an execution
only once every rank has asked for the epoch, so each execution sees the plan of its own epoch. Decode tasks
report per visit how many good records it held (how the checkpoint knows a visit is complete) and how many
records they decoded.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import ray

from blip2_ray.runtime.actors import job_actor, release_job_actor

PLAN_NAMESPACE = "blip2_ray"


# ------------------------------------------------------------------------------------ record bitmaps
def pack_records(numbers) -> bytes:
    """Record numbers (ints >= 0) -> a little-endian bitmap (bit n set: record n)."""
    numbers = np.asarray(list(numbers), dtype=np.int64)
    if numbers.size == 0:
        return b""
    bits = np.zeros(int(numbers.max()) + 1, dtype=bool)
    bits[numbers] = True
    return np.packbits(bits, bitorder="little").tobytes()


def unpack_records(bitmap: bytes) -> np.ndarray:
    """A bitmap of `pack_records` -> bool array (index n: record n is in it; may be shorter than the file)."""
    return np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8), bitorder="little").astype(bool)


def union_records(a: bytes, b: bytes) -> bytes:
    """Bitwise OR of two bitmaps of any lengths."""
    if len(a) < len(b):
        a, b = b, a
    out = np.frombuffer(a, dtype=np.uint8).copy()
    out[: len(b)] |= np.frombuffer(b, dtype=np.uint8)
    return out.tobytes()


def count_records(bitmap: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(bitmap, dtype=np.uint8)).sum())


# ------------------------------------------------------------------------------------------ the plan
@ray.remote(num_cpus=0)
class EpochPlan:
    """The epoch a training dataset reads now, what it skips, and what its decode tasks reported."""

    def __init__(self, epoch: int = 0):
        self._epoch, self._consumed, self._partial = epoch, frozenset(), {}
        self._generation = 0  # how many times `begin` was called: tags the decode reports of each execution
        self._good: dict[tuple[int, int], int] = {}
        self._decoded: Counter = Counter()  # (epoch, generation) -> records decoded

    def begin(self, epoch: int, consumed: list[int] | None = None, partial: dict[int, bytes] | None = None) -> int:
        """The next execution reads `epoch`, without the `consumed` visits and the `partial` bitmaps' records.

        Returns the new generation (1, 2, ...).
        """
        self._epoch, self._consumed, self._partial = epoch, frozenset(consumed or ()), dict(partial or {})
        self._generation += 1
        return self._generation

    def current(self) -> tuple[int, frozenset, dict[int, bytes], int]:
        """(epoch, consumed visits, partial bitmaps, generation) of the next execution."""
        return self._epoch, self._consumed, self._partial, self._generation

    def visit_done(self, epoch: int, visit: int, good: int, decoded: int, generation: int = 0) -> None:
        """A decode task read a visit to its end: `good` records it holds (trained ones included), `decoded`."""
        self._good[(epoch, visit)] = good
        self._decoded[(epoch, generation)] += decoded

    def good_records(self, epoch: int) -> dict[int, int]:
        """visit -> good records of the visits of `epoch` read to their end so far."""
        return {v: n for (e, v), n in self._good.items() if e == epoch}

    def decoded_records(self, epoch: int, after_generation: int = 0) -> int:
        """Records decoded for `epoch` (good or bad; not those a resume skipped) by executions planned after
        generation `after_generation`."""
        return sum(n for (e, g), n in self._decoded.items() if e == epoch and g > after_generation)

    def generation(self) -> int:
        return self._generation


def epoch_plan_name(run_name: str) -> str:
    """The plan actor of a run in this Ray job (the driver creates it; the Train workers look it up)."""
    return f"EpochPlan-{run_name}-{ray.get_runtime_context().get_job_id()}"


def epoch_plan(name: str, create: bool = False):
    """The EpochPlan actor called `name` (created at epoch 0, on this node, with `create`)."""
    return job_actor(EpochPlan, name, PLAN_NAMESPACE, create)


def release_epoch_plan(name: str) -> None:
    """The run is over: its plan actor ends (a driver that runs several trainings, a notebook or a test session,
    would otherwise keep one process per finished run)."""
    release_job_actor(name, PLAN_NAMESPACE)
