"""Shard readers, Ray-free: list sources (local or S3), stream records out of tars and parquet files.

A record is a dict {"key": str, "image": bytes | None, "caption": bytes | None}: raw bytes, decoded
later. Readers never raise on bad data; shard-level problems are reported through `on_skip(reason)`.
"""

from __future__ import annotations

import glob as globlib
import json
import os
import tarfile
from typing import Callable, Iterator

from blip2_ray.data.transforms import EMPTY_SHARD, TRUNCATED_SHARD
from blip2_ray.errors import UserError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = set("*?[")


def storage_options(endpoint_url: str | None = None, anonymous: bool = False, region: str | None = None,
                    capture_env_credentials: bool = True) -> dict:
    """s3fs keyword arguments, resolved once on the driver and handed to every read task explicitly.

    The endpoint comes from the argument or AWS_ENDPOINT_URL(_S3). Credentials found in the driver's
    environment are passed along so workers read with the same identity as the driver; without them
    s3fs uses the worker's own AWS chain (instance role, ~/.aws).
    """
    opts: dict = {}
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    if region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        region = region or os.environ.get("AWS_REGION") or os.environ["AWS_DEFAULT_REGION"]
        opts["client_kwargs"] = {"region_name": region}
    if anonymous:
        opts["anon"] = True
    elif capture_env_credentials and os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        opts["key"] = os.environ["AWS_ACCESS_KEY_ID"]
        opts["secret"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            opts["token"] = os.environ["AWS_SESSION_TOKEN"]
    return opts


def is_s3(path: str) -> bool:
    return path.startswith("s3://")


def s3_filesystem(opts: dict):
    import s3fs

    return s3fs.S3FileSystem(**opts)


def open_file(path: str, s3_opts: dict | None = None):
    """A binary file object for a local path or an s3:// URI (streamed, read-ahead buffered)."""
    if is_s3(path):
        return s3_filesystem(s3_opts or {}).open(path, "rb", block_size=8 << 20, cache_type="readahead")
    return open(path, "rb")


def shard_format(path: str) -> str:
    return "parquet" if path.lower().endswith(PARQUET_SUFFIXES) else "webdataset"


def _is_shard(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES + PARQUET_SUFFIXES)


def _drop_metadata_parquets(files: list[str]) -> list[str]:
    # img2dataset's webdataset output puts a metadata-only 00000.parquet beside 00000.tar: skip it.
    tar_stems = {f[: -len(s)] for f in files for s in TAR_SUFFIXES if f.lower().endswith(s)}
    return [f for f in files if not (f.lower().endswith(".parquet") and f[: -len(".parquet")] in tar_stems)]


def list_shards(path: str, s3_opts: dict | None = None) -> list[str]:
    """The shard files a source names (a file, a directory, a glob, or an S3 prefix), sorted.

    Raises UserError (one sentence) if the path does not exist or holds no shard.
    """
    if is_s3(path):
        fs = s3_filesystem(s3_opts or {})
        bare = path[len("s3://"):]
        try:
            if _GLOB_CHARS & set(bare):
                found = fs.glob(bare)
            elif fs.isfile(bare):
                found = [bare]
            else:
                found = fs.find(bare.rstrip("/") + "/")
        except (PermissionError, OSError) as e:
            raise UserError(f"cannot list {path!r} ({e.__class__.__name__}: {e}); check the bucket name, "
                            f"credentials and s3_endpoint_url") from None
        files = sorted("s3://" + f for f in found if _is_shard(f))
    else:
        if _GLOB_CHARS & set(path):
            found = globlib.glob(path, recursive=True)
        elif os.path.isfile(path):
            found = [path]
        elif os.path.isdir(path):
            found = [os.path.join(root, n) for root, _, names in os.walk(path) for n in names]
        else:
            raise UserError(f"data source {path!r} does not exist; pass a shard file, a directory, a glob or an "
                            f"s3:// URI")
        files = sorted(os.path.abspath(f) for f in found if os.path.isfile(f) and _is_shard(f))
    if not files:
        raise UserError(f"data source {path!r} holds no .tar or .parquet shard")
    return _drop_metadata_parquets(files)


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset naming: 'dir/000123.jpg' -> ('dir/000123', 'jpg'); the suffix starts at the first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def _record(key: str, members: dict[str, bytes], image_keys: list[str], caption_keys: list[str]) -> dict:
    image = next((members[k] for k in image_keys if k in members), None)
    caption = next((members[k] for k in caption_keys if k in members), None)
    return {"key": key, "image": image, "caption": caption}


def read_tar_records(path: str, image_keys: list[str], caption_keys: list[str],
                     on_skip: Callable[[str], None], s3_opts: dict | None = None) -> Iterator[dict]:
    """Stream the records of a WebDataset tar (members of one key contiguous).

    A tar cut short keeps every record completed before the break (`truncated_shard` counted once):
    the record being read at the break is delivered only if its image and caption arrived whole. A
    tar with no record counts `empty_shard`.
    """
    n = 0
    key, members = None, {}
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
                            yield _record(key, members, image_keys, caption_keys)
                        key, members = k, {}
                    cut_in_data = True
                    data = tar.extractfile(info).read()
                    if len(data) != info.size:
                        raise tarfile.ReadError("unexpected end of data")
                    cut_in_data = False
                    members[suffix] = data
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
            rec = _record(key, members, image_keys, caption_keys)
            if rec["image"] is not None and rec["caption"] is not None:
                yield rec
        return
    if key is not None:
        n += 1
        yield _record(key, members, image_keys, caption_keys)
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
                    n += 1
                    record = {"key": str(key), "image": _to_bytes(d[image_col][i]),
                              "caption": _to_bytes(d[caption_col][i])}
                    if "question" in d:  # VQA shards (data/annotations.write_vqa_shards)
                        record["question"] = d["question"][i]
                    if "instruction" in d:  # instruction shards (data/instruct.write_instruct_shards)
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
