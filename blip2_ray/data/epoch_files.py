"""The training dataset's source: one Ray Data read task per shard visit of the epoch its EpochPlan names
(data/epoch_plan.py says how an epoch is planned and resumed). Apart from the plan, so that the plan's actor
process does not import Ray Data (2.2 CPU s on the 2-core machine)."""

from __future__ import annotations

import functools
from typing import Iterator

import ray
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from blip2_ray.data.epoch_plan import epoch_plan


class EpochFiles(Datasource):
    """One read task per shard visit of the epoch, yielding `decode({"visit", "path", "epoch", "skip", "generation"})`.

    `visits(epoch)` gives the epoch's visit list (paths); `decode` yields batches (dicts of numpy columns);
    "skip" is the visit's bitmap of trained records, "generation" the plan's (EpochPlan.begin); `plan_name`
    None: always `epoch`, nothing skipped (eval datasets).
    """

    def __init__(self, visits, epoch: int, plan_name: str | None, decode):
        self._visits, self._epoch, self._plan_name, self._decode = visits, epoch, plan_name, decode

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        epoch, consumed, partial, generation = self._epoch, frozenset(), {}, 0
        if self._plan_name is not None:
            epoch, consumed, partial, generation = ray.get(epoch_plan(self._plan_name).current.remote())
        tasks = []
        for visit, path in enumerate(self._visits(epoch)):
            if visit in consumed:
                continue
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=[path], exec_stats=None)
            task = {"visit": visit, "path": path, "epoch": epoch, "skip": partial.get(visit, b""),
                    "generation": generation}
            read = functools.partial(_blocks, self._decode, task)
            tasks.append(ReadTask(read, meta))
        if not tasks:  # a resume right at the end of an epoch: an empty epoch, not a dataset without tasks
            tasks.append(ReadTask(_no_blocks, BlockMetadata(num_rows=0, size_bytes=0, input_files=[], exec_stats=None)))
        return tasks


def _no_blocks() -> Iterator:
    return iter(())


def _blocks(decode, task: dict) -> Iterator:
    from ray.data.block import BlockAccessor

    for batch in decode(task):
        yield BlockAccessor.batch_to_block(batch)
