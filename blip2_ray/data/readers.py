"""Shard readers, Ray-free: stream records out of tars and parquet files (sources listed by `data.sources`).

A record is a dict {"key": str, "image": bytes | None, "caption": bytes | None}: raw bytes, decoded
later, plus where its image lies in the shard ("image_at": a tar member's (data offset, size) in the
uncompressed stream; a parquet row's number), so an index can read one image back later
(`read_image_at`). Readers never raise on bad data; shard-level problems are reported through
`on_skip(reason)`.
"""

from __future__ import annotations

import json
import os
import tarfile
from typing import Callable, Iterator

from blip2_ray.data.sources import is_s3, open_file, s3_filesystem, shard_format
from blip2_ray.data.transforms import EMPTY_SHARD, TRUNCATED_SHARD
from blip2_ray.errors import UserError


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset naming: 'dir/000123.jpg' -> ('dir/000123', 'jpg'); the suffix starts at the first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def _record(key: str, members: dict[str, bytes], image_keys: list[str], caption_keys: list[str],
            offsets: dict[str, int] | None = None) -> dict:
    image_key = next((k for k in image_keys if k in members), None)
    caption = next((members[k] for k in caption_keys if k in members), None)
    image = members[image_key] if image_key is not None else None
    at = (offsets[image_key], len(image)) if image_key is not None and offsets else None
    return {"key": key, "image": image, "caption": caption, "image_at": at}


def read_tar_records(path: str, image_keys: list[str], caption_keys: list[str],
                     on_skip: Callable[[str], None], s3_opts: dict | None = None) -> Iterator[dict]:
    """Stream the records of a WebDataset tar (members of one key contiguous).

    A tar cut short keeps every record completed before the break (`truncated_shard` counted once):
    the record being read at the break is delivered only if its image and caption arrived whole. A
    tar with no record counts `empty_shard`.
    """
    n = 0
    key, members, offsets = None, {}, {}
    cut_in_data = False
    try:
        with open_file(path, s3_opts) as raw:
            f = _TailRecorder(raw)
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    k, suffix = _split_key(info.name)
                    if k != key:  # a new key: the previous record is complete
                        if key is not None:
                            n += 1
                            yield _record(key, members, image_keys, caption_keys, offsets)
                        key, members, offsets = k, {}, {}
                    cut_in_data = True
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError("unexpected end of data")
                    cut_in_data = False
                    members[suffix] = data
                    offsets[suffix] = info.offset_data
                # tarfile ends a stream quietly when a header is cut short or missing: an archive
                # that is complete ends with a zero block right where the last member ended.
                if tar.fileobj.comptype == "tar" and not f.zero_block_at(tar.offset):
                    raise tarfile.ReadError("archive ends without its end-of-archive block")
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        if isinstance(e, tarfile.ReadError) and "empty file" in str(e) and key is None:
            on_skip(EMPTY_SHARD)
            return
        if isinstance(e, FileNotFoundError):
            raise UserError(f"shard {path!r} disappeared while reading it") from None
        on_skip(TRUNCATED_SHARD)
        if key is not None and not cut_in_data:
            rec = _record(key, members, image_keys, caption_keys, offsets)
            if rec["image"] is not None and rec["caption"] is not None:
                yield rec
        return
    if key is not None:
        n += 1
        yield _record(key, members, image_keys, caption_keys, offsets)
    if n == 0:
        on_skip(EMPTY_SHARD)


class _TailRecorder:
    """A read-only file wrapper remembering the last bytes read (to check how a tar stream ended)."""

    def __init__(self, f, keep: int = 1 << 16):
        self._f, self._keep, self.pos, self.tail = f, keep, 0, b""

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.pos += len(data)
        self.tail = (self.tail + data)[-self._keep:]
        return data

    def zero_block_at(self, offset: int) -> bool:
        start = offset - (self.pos - len(self.tail))
        block = self.tail[start:start + tarfile.BLOCKSIZE] if start >= 0 else b""
        return len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE


def _to_bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
        return None if value is None else bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (list, tuple)):  # a list<string> column of several captions
        return json.dumps(list(value)).encode("utf-8")
    return bytes(value)


def parquet_columns(schema_names: list[str], path: str, image_keys: list[str],
                    caption_keys: list[str]) -> tuple[str, str]:
    """(image column, caption column) of a parquet file; UserError naming the file and column if absent."""
    image_col = next((c for c in image_keys if c in schema_names), None)
    if image_col is None:
        raise UserError(f"parquet file {path!r} has no image column (looked for {', '.join(image_keys)}; "
                        f"it has {', '.join(schema_names)}); set data.image_keys")
    caption_col = next((c for c in caption_keys if c in schema_names), None)
    if caption_col is None:
        raise UserError(f"parquet file {path!r} has no caption column (looked for {', '.join(caption_keys)}; "
                        f"it has {', '.join(schema_names)}); set data.caption_keys")
    return image_col, caption_col


def check_parquet_columns(path: str, image_keys: list[str], caption_keys: list[str],
                          s3_opts: dict | None = None) -> None:
    """Raise UserError if the parquet file at `path` lacks an image or caption column (footer only)."""
    import pyarrow.parquet as pq

    with open_file(path, s3_opts) as f:
        try:
            names = pq.ParquetFile(f).schema_arrow.names
        except Exception:
            return  # unreadable files are counted as skipped shards when read
    parquet_columns(names, path, image_keys, caption_keys)


def read_parquet_records(path: str, image_keys: list[str], caption_keys: list[str],
                         on_skip: Callable[[str], None], s3_opts: dict | None = None,
                         batch_rows: int = 64) -> Iterator[dict]:
    """Stream the records of a parquet file (image bytes + caption columns, optional `key` and `question`)."""
    import pyarrow.parquet as pq

    stem = os.path.basename(path).rsplit(".", 1)[0]
    with open_file(path, s3_opts) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception:
            on_skip(TRUNCATED_SHARD if _nonempty(f) else EMPTY_SHARD)
            return
        names = pf.schema_arrow.names
        image_col, caption_col = parquet_columns(names, path, image_keys, caption_keys)
        cols = [image_col, caption_col] + [c for c in ("key", "question", "instruction") if c in names]
        n = 0
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
                d = batch.to_pydict()
                keys = d.get("key") or [None] * batch.num_rows
                for i in range(batch.num_rows):
                    key = keys[i] if keys[i] is not None else f"{stem}:{n}"
                    record = {"key": str(key), "image": _to_bytes(d[image_col][i]),
                              "caption": _to_bytes(d[caption_col][i]), "image_at": n}
                    n += 1
                    if "question" in d:  # VQA shards (data/annotations.write_vqa_shards)
                        record["question"] = d["question"][i]
                    if "instruction" in d:  # instruction shards (data/instruct_shards.write_instruct_shards)
                        record["instruction"] = d["instruction"][i]
                    yield record
        except OSError:
            on_skip(TRUNCATED_SHARD)
            return
        if n == 0:
            on_skip(EMPTY_SHARD)


def _nonempty(f) -> bool:
    try:
        f.seek(0, os.SEEK_END)
        return f.tell() > 0
    except Exception:
        return True


def read_shard_records(path: str, image_keys: list[str], caption_keys: list[str],
                       on_skip: Callable[[str], None], s3_opts: dict | None = None) -> Iterator[dict]:
    """Records of one shard, tar or parquet by its extension."""
    reader = read_parquet_records if shard_format(path) == "parquet" else read_tar_records
    yield from reader(path, image_keys, caption_keys, on_skip, s3_opts)


def read_images_at(path: str, positions: list, image_keys: list[str],
                   s3_opts: dict | None = None) -> list[bytes | None]:
    """The image bytes of records of one shard, read back from where the reader found them (their
    `record["image_at"]`); None for an image that cannot be read any more (file gone, cut short).

    Tar: a seek and a read per image ((offset, size) in the uncompressed stream; one range request
    each on S3); a compressed tar is decompressed up to each offset (slow: index plain tars).
    Parquet: the image column of each row group holding a wanted row, read once.
    """
    out: list[bytes | None] = [None] * len(positions)
    try:
        if shard_format(path) == "parquet":
            _parquet_images_at(path, positions, image_keys, s3_opts, out)
        else:
            _tar_images_at(path, positions, s3_opts, out)
    except Exception:  # a file gone or cut short, or an S3 error (botocore's are not OSErrors)
        pass  # what was read stays; the rest is None
    return out


def _tar_images_at(path: str, positions: list, s3_opts: dict | None, out: list) -> None:
    order = sorted(range(len(positions)), key=lambda i: positions[i][0])
    if is_s3(path) and not path.lower().endswith((".gz", ".tgz")):
        fs = s3_filesystem(s3_opts or {})
        for i in order:
            offset, size = positions[i]
            data = fs.cat_file(path, start=offset, end=offset + size)
            out[i] = data if len(data) == size else None
        return
    with open_file(path, s3_opts) as raw:
        f = raw
        if path.lower().endswith((".gz", ".tgz")):
            import gzip

            f = gzip.GzipFile(fileobj=raw)
        for i in order:  # ascending offsets: a compressed stream only ever moves forward
            offset, size = positions[i]
            f.seek(offset)
            data = f.read(size)
            out[i] = data if len(data) == size else None


def _parquet_images_at(path: str, positions: list, image_keys: list[str], s3_opts: dict | None, out: list) -> None:
    import pyarrow.parquet as pq

    with open_file(path, s3_opts) as f:
        pf = pq.ParquetFile(f)
        image_col = next((c for c in image_keys if c in pf.schema_arrow.names), None)
        if image_col is None:
            return
        starts = [0]
        for g in range(pf.num_row_groups):
            starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
        wanted: dict[int, list[int]] = {}
        for i, row in enumerate(positions):
            g = next((g for g in range(pf.num_row_groups) if starts[g] <= int(row) < starts[g + 1]), None)
            if g is not None:
                wanted.setdefault(g, []).append(i)
        for g, items in sorted(wanted.items()):
            column = pf.read_row_group(g, columns=[image_col]).column(0)
            for i in items:
                out[i] = _to_bytes(column[int(positions[i]) - starts[g]].as_py())
