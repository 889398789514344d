"""Whole records in, whole records out: CapFilt keeps every member of a record and adds its captions.

Reading keeps all members of a tar record (jpg, json, ...) or all columns of a parquet row; writing puts
the kept captions where the training pipeline looks (the caption member / column, as a JSON list it
draws one caption from per visit) plus a `capfilt` member/column with the scores. A shard appears
under its final name only once complete (written to a hidden temporary name, then renamed).
"""

from __future__ import annotations

import io
import os
import tarfile
from typing import Callable, Iterator

from blip2_ray.data.readers import _split_key
from blip2_ray.data.sources import open_file, shard_format
from blip2_ray.data.transforms import EMPTY_SHARD, TRUNCATED_SHARD
from blip2_ray.runtime.files import atomic_path


def read_tar_members(path: str, on_skip: Callable[[str], None],
                     s3_opts: dict | None = None) -> Iterator[tuple[str, dict]]:
    """(key, {suffix: bytes}) for every complete record of a WebDataset tar; a cut-short tar keeps the
    records before the break (`truncated_shard` counted), an empty one counts `empty_shard`."""
    key, members, n = None, {}, 0
    try:
        with open_file(path, s3_opts) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                k, suffix = _split_key(info.name)
                if k != key:
                    if key is not None:
                        n += 1
                        yield key, members
                    key, members = k, {}
                data = tar.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                members[suffix] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if isinstance(e, tarfile.ReadError) and "empty file" in str(e) and key is None:
            on_skip(EMPTY_SHARD)
        else:
            on_skip(TRUNCATED_SHARD)
        return  # the record being read at the break is incomplete: dropped
    if key is not None:
        n += 1
        yield key, members
    if n == 0:
        on_skip(EMPTY_SHARD)


def read_parquet_rows(path: str, on_skip: Callable[[str], None],
                      s3_opts: dict | None = None) -> tuple[list[dict], object]:
    """(rows as dicts, arrow schema) of a parquet shard; an unreadable file counts `truncated_shard`."""
    import pyarrow.parquet as pq

    with open_file(path, s3_opts) as f:
        try:
            table = pq.read_table(f)
        except Exception:
            on_skip(TRUNCATED_SHARD)
            return [], None
    if table.num_rows == 0:
        on_skip(EMPTY_SHARD)
    return table.to_pylist(), table.schema


def output_path(out_dir: str, in_path: str) -> str:
    """Where the CapFilt version of the shard `in_path` goes: the same file name in `out_dir`."""
    return os.path.join(out_dir, os.path.basename(in_path))


def write_tar(final: str, records: list[tuple[str, dict[str, bytes]]]) -> None:
    """Write records [(key, {suffix: bytes})] to `final` atomically."""
    with atomic_path(final) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in records:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))


def write_parquet(final: str, rows: list[dict], schema, caption_col: str) -> None:
    """Write rows to `final` atomically: the caption column becomes list<string>, `capfilt` a JSON string."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [f for f in (schema or []) if f.name not in (caption_col, "capfilt")]
    fields += [pa.field(caption_col, pa.list_(pa.string())), pa.field("capfilt", pa.string())]
    table = pa.Table.from_pylist(rows, schema=pa.schema(fields))
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, row_group_size=64)


def is_parquet(path: str) -> bool:
    return shard_format(path) == "parquet"
