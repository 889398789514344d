"""Where a run is in its data, as a checkpoint records it: the epoch, its fully trained shard visits, the
trained records of the partly trained ones. Ray-free: the loop gathers, this module merges.

Each rank notes the (visit, record) of every row it trains (`TrainedRecords`); at a checkpoint rank 0
gathers what every rank trained since the previous one and folds it into the run's `DataPosition`. A visit
whose trained records reach the good records its decode task reported (EpochPlan.good_records) is
consumed: a resumed run never reads it again. The others keep a bitmap of their trained records: a resumed
run reads those files but decodes only the records not in it. So within an epoch a resume trains no record
twice and loses none (rows in a shuffle buffer or prefetch queue at the checkpoint were not trained: they
come again); the decode work of a resume is the partial visits' untrained records plus the unread visits.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

from blip2_ray.data.epoch_plan import count_records, pack_records, union_records


@dataclass
class DataPosition:
    epoch: int = 0
    consumed: set[int] = field(default_factory=set)  # visits of `epoch` trained to their end
    partial: dict[int, bytes] = field(default_factory=dict)  # visit -> bitmap of its trained records

    def to_state(self) -> dict:
        """JSON-ready: {"epoch", "consumed": [visits], "partial": {visit: base64 bitmap}}."""
        return {"epoch": self.epoch, "consumed": sorted(self.consumed),
                "partial": {str(v): base64.b64encode(b).decode("ascii") for v, b in sorted(self.partial.items())}}

    @classmethod
    def from_state(cls, state: dict) -> DataPosition:
        return cls(int(state["epoch"]), set(int(v) for v in state["consumed"]),
                   {int(v): base64.b64decode(b) for v, b in state["partial"].items()})

    def records_skipped(self) -> int:
        return sum(count_records(b) for b in self.partial.values())


class TrainedRecords:
    """This rank's trained rows since the last checkpoint: (epoch, visit -> record numbers)."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch
        self._records: dict[int, list[np.ndarray]] = {}

    def add(self, epoch: int, visits: np.ndarray, records: np.ndarray) -> None:
        """Rows of one trained micro batch; a new epoch forgets the old one's rows."""
        if epoch != self.epoch:
            self.epoch, self._records = epoch, {}
        visits, records = np.asarray(visits), np.asarray(records)
        for v in np.unique(visits):
            self._records.setdefault(int(v), []).append(records[visits == v])

    def take(self) -> tuple[int, dict[int, bytes]]:
        """(epoch, visit -> bitmap) of the rows since the last take; then forgets them (rank 0 holds them now)."""
        out = {v: pack_records(np.concatenate(parts)) for v, parts in self._records.items()}
        self._records = {}
        return self.epoch, out


def merge_position(position: DataPosition, per_rank: list[tuple[int, dict[int, bytes]]],
                   good_records: dict[int, int]) -> tuple[DataPosition, list[str]]:
    """Fold every rank's `TrainedRecords.take()` into `position`; (the new position, warnings).

    The epoch is the latest any rank is in (the ranks move through epochs together: equal splits,
    fixed-size batches); rows of an earlier epoch are dropped. A visit is consumed once its trained records
    reach `good_records[visit]` (visit -> good records of the epoch, known once its decode task finished).
    """
    warnings = []
    epoch = max([position.epoch] + [e for e, _ in per_rank])
    if any(e != epoch for e, bits in per_rank if bits):
        warnings.append(f"ranks were in different epochs at this checkpoint ({sorted({e for e, _ in per_rank})}); "
                        f"only epoch {epoch}'s trained records are recorded")
    out = DataPosition(epoch) if epoch != position.epoch else DataPosition(
        epoch, set(position.consumed), dict(position.partial))
    for e, bits in per_rank:
        if e != epoch:
            continue
        for visit, bitmap in bits.items():
            if visit not in out.consumed:
                out.partial[visit] = union_records(out.partial.get(visit, b""), bitmap)
    for visit in list(out.partial):
        good = good_records.get(visit)
        if good is not None and count_records(out.partial[visit]) >= good:
            out.consumed.add(visit)
            del out.partial[visit]
    return out, warnings
