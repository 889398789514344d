"""The records the data pipeline dropped, counted per reason: one named `SkipCounter` actor per Ray job.

Decode tasks add their counts under a dataset tag ("train", "eval", "check", ...) with `report_skips`; the driver
and the Train workers read them with `get_skip_counts(tag)` (the training metrics' skipped records, the
check-data command's report).
"""

from __future__ import annotations

import logging
from collections import Counter

import ray

from blip2_ray.runtime.actors import job_actor

log = logging.getLogger(__name__)

SKIP_COUNTER_NAMESPACE = "blip2_ray"


@ray.remote(num_cpus=0)
class SkipCounter:
    """Per-reason counts of dropped records, per dataset tag ("train", "eval", "check", ...)."""

    def __init__(self):
        self._counts: dict[str, Counter] = {}

    def add(self, tag: str, counts: dict[str, int]) -> None:
        self._counts.setdefault(tag, Counter()).update(counts)

    def get_skip_counts(self, tag: str | None = None) -> dict[str, int]:
        """Counts of one tag, or summed over all tags when `tag` is None."""
        if tag is not None:
            return dict(self._counts.get(tag, {}))
        total: Counter = Counter()
        for c in self._counts.values():
            total.update(c)
        return dict(total)

    def reset(self, tag: str | None = None) -> None:
        if tag is None:
            self._counts.clear()
        else:
            self._counts.pop(tag, None)


def _counter_name() -> str:
    # One counter per Ray job: Train workers and data tasks of a job share its job id.
    return f"SkipCounter-{ray.get_runtime_context().get_job_id()}"


def skip_counter(create: bool = False):
    """The job's SkipCounter actor handle (created by the driver in `build_dataset`)."""
    return job_actor(SkipCounter, _counter_name(), SKIP_COUNTER_NAMESPACE, create)


def get_skip_counts(tag: str | None = None) -> dict[str, int]:
    """Per-reason skip counts of the datasets this job built (`tag` as given to build_dataset).

    Counts accumulate over every execution of a dataset (each epoch counts again).
    """
    try:
        counter = skip_counter()
    except ValueError:  # no dataset built yet in this job
        return {}
    return ray.get(counter.get_skip_counts.remote(tag))


def reset_skip_counts(tag: str | None = None) -> None:
    try:
        ray.get(skip_counter().reset.remote(tag))
    except ValueError:
        pass


def report_skips(tag: str, counts: Counter) -> None:
    """Add a decode task's per-reason counts to the job's SkipCounter (never raises: counting must not stop data)."""
    if not counts:
        return
    try:
        # waited on: the counts are complete once the stream has been consumed
        ray.get(skip_counter().add.remote(tag, dict(counts)))
    except Exception as e:  # counting must never stop the data
        log.warning("could not report skip counts %s: %s", dict(counts), e)
