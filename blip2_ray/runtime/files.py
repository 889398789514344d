"""Files that appear complete or not at all: written under a hidden temporary name, then renamed."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import uuid
from typing import Any, Iterator


def temporary_path(final: str) -> str:
    """A fresh temporary name beside `final`: hidden and without `final`'s suffix, so that nothing
    listing the directory for shards or reports (the data pipeline, CapFilt's resume) ever reads it."""
    folder, name = os.path.split(final)
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")


def stale_temporaries(final: str) -> list[str]:
    """Temporaries of `final` left by an interrupted writer (never renamed, safe to delete)."""
    folder, name = os.path.split(final)
    return glob.glob(os.path.join(folder, f".{glob.escape(name)}.*.tmp"))


@contextlib.contextmanager
def atomic_path(final: str) -> Iterator[str]:
    """Yield a temporary path to write `final` to; when the block ends it is renamed to `final`
    (atomic on one filesystem), and when the block raises it is removed. Creates the parent folder."""
    os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
    tmp = temporary_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(final: str, data: Any) -> None:
    """`data` as JSON at `final`, complete or not at all."""
    with atomic_path(final) as tmp, open(tmp, "w") as f:
        json.dump(data, f)
