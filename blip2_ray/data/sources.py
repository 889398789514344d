"""Where shards are: S3 settings resolved once on the driver (`storage_options`), files opened locally or on S3,
and a data source (a file, a folder, a glob, local or s3://) listed as its tar / parquet shards."""

from __future__ import annotations

import glob as globlib
import os

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
