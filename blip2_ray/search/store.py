"""The index directory, Ray-free: its files, its manifest (the commit point), each shard's stored
features and rows, and the identity of the model that computed them.

    OUT/index.json             the manifest: model, kind and parameters, the files below, the shards in index order
    OUT/index-<v>.faiss        the FAISS index: Q vectors per image, image i's at ids i*Q .. i*Q+Q-1
    OUT/images-<v>.arrow       one row per image (Arrow IPC, memory-mapped): key, caption, shard, where its image is
    OUT/shards/<id>.json       one shard done (its counts; written last: the shard's commit point)
    OUT/shards/<id>.arrow      its rows (key, caption, image location), in feature order
    OUT/shards/<id>.npy        its float32 ITC features (n, Q, E) (kept unless index.keep_features is false)

A rerun reads the manifest and the shards' json files: shards done are not computed again, shards done
but not yet in the index are added, and the new manifest names the new index and images files
(version v + 1) once they are complete, so a reader never sees a half-written index.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from blip2_ray.errors import UserError
from blip2_ray.runtime.files import atomic_path, write_json_atomic

FORMAT = 1
MANIFEST = "index.json"
SHARDS_DIR = "shards"
ROW_COLUMNS = ("key", "caption", "offset", "size")  # offset, size: a tar member's data; parquet: row number, -1


# ------------------------------------------------------------------------------------------- model
def model_identity(model_dir: str) -> dict:
    """{"name", "path", "fingerprint"} of a stage-1 export: the fingerprint hashes config.json and every
    weight file (*.safetensors, *.bin), names and bytes, so two exports agree only with the same weights."""
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UserError(f"model {model_dir!r} is not a model export directory (no config.json)")
    files = sorted(f for f in os.listdir(model_dir) if f == "config.json" or f.endswith((".safetensors", ".bin")))
    h = hashlib.blake2b(digest_size=16)
    for name in files:
        h.update(name.encode() + b"\0")
        with open(os.path.join(model_dir, name), "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return {"name": os.path.basename(os.path.normpath(model_dir)), "path": os.path.abspath(model_dir),
            "fingerprint": h.hexdigest()}


def same_model_or_error(built_with: dict, serving: dict, index_dir: str) -> None:
    """UserError naming both models when an index's features come from another model than `serving`."""
    if built_with["fingerprint"] != serving["fingerprint"]:
        raise UserError(f"the index {index_dir!r} was built with model {built_with['name']!r} "
                        f"({built_with['path']}, weights {built_with['fingerprint'][:12]}) but the model here is "
                        f"{serving['name']!r} ({serving['path']}, weights {serving['fingerprint'][:12]}); serve the "
                        f"model the index was built with, or index the collection again with this one")


# ------------------------------------------------------------------------------------------ shards
def shard_id(path: str) -> str:
    """A file-name-safe id of one shard path or URI: its name plus a hash of the whole path."""
    digest = hashlib.blake2b(path.encode(), digest_size=5).hexdigest()
    return f"{os.path.basename(path.rstrip('/'))}-{digest}"


def shard_file(out_dir: str, sid: str, suffix: str) -> str:
    return os.path.join(out_dir, SHARDS_DIR, f"{sid}.{suffix}")


def write_shard(out_dir: str, sid: str, features: np.ndarray, rows: dict, summary: dict) -> None:
    """Store one shard's features (n, Q, E) float32 and rows {key, caption, offset, size}; the summary last."""
    import pyarrow as pa

    with atomic_path(shard_file(out_dir, sid, "npy")) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(features, dtype=np.float32))
    table = pa.table({"key": pa.array(rows["key"], pa.string()), "caption": pa.array(rows["caption"], pa.string()),
                      "offset": pa.array(rows["offset"], pa.int64()), "size": pa.array(rows["size"], pa.int64())})
    write_arrow(shard_file(out_dir, sid, "arrow"), table)
    write_json_atomic(shard_file(out_dir, sid, "json"), summary)


def shard_summary(out_dir: str, sid: str) -> dict | None:
    """The summary of a shard that is done, None if it is not."""
    path = shard_file(out_dir, sid, "json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def shard_features(out_dir: str, sid: str) -> np.ndarray:
    """A shard's features (n, Q, E) float32, memory-mapped."""
    path = shard_file(out_dir, sid, "npy")
    if not os.path.isfile(path):
        raise UserError(f"the features of shard {sid!r} are no longer in {out_dir!r} (index.keep_features was "
                        f"false); index the collection into a new output_dir")
    return np.load(path, mmap_mode="r")


def shard_rows(out_dir: str, sid: str):
    return read_arrow(shard_file(out_dir, sid, "arrow"))


# ---------------------------------------------------------------------------------- arrow, manifest
def write_arrow(final: str, table) -> None:
    import pyarrow as pa

    with atomic_path(final) as tmp, pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def read_arrow(path: str):
    """An Arrow IPC file as a table whose buffers are memory-mapped (nothing is copied until used)."""
    import pyarrow as pa

    with pa.memory_map(path, "r") as source:
        return pa.ipc.open_file(source).read_all()


def read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        m = json.load(f)
    if m.get("format") != FORMAT:
        raise UserError(f"{path!r} is an index of format {m.get('format')!r}; this version reads format {FORMAT}")
    return m


def require_manifest(index_dir: str) -> dict:
    """The manifest of an index directory; UserError when `index_dir` holds no index."""
    m = read_manifest(index_dir) if os.path.isdir(index_dir) else None
    if m is None:
        raise UserError(f"{index_dir!r} holds no image index ({MANIFEST}); build one with jobs/index.py")
    return m


def write_manifest(out_dir: str, manifest: dict) -> None:
    write_json_atomic(os.path.join(out_dir, MANIFEST), {"format": FORMAT, **manifest})
