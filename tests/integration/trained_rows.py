"""What a run's `fault_injection.trained_keys_dir` says the final model learned from (shared by the tests that
train across a restart or a resume; importable from a test module and from test_multinode run as a script)."""

from __future__ import annotations

import os


def surviving_rows(trained_dir) -> list[tuple[int, str, int]]:
    """(epoch, key, pixel CRC) of every row the final model learned from: each run's rows up to the step
    the next run resumed from (what a run trained after its last checkpoint was rolled back)."""
    rows = []
    for path in sorted(os.listdir(trained_dir)):
        with open(os.path.join(trained_dir, path)) as f:
            rows += [line.split() for line in f]
    starts = sorted({int(r[0]) for r in rows})
    ends = dict(zip(starts, starts[1:] + [10 ** 9]))
    return [(int(e), k, int(c)) for s, step, e, k, c in rows if int(step) <= ends[int(s)]]
