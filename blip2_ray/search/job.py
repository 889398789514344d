"""Indexing as a Ray Data batch job: one shard per actor call, an actor pool holding the stage-1 model,
then the FAISS index built or grown on the driver (`build.update_index`).

Resumable per shard: a shard whose features are stored (its `shards/<id>.json` exists) is not computed
again, so an interrupted run loses at most the shards in flight, and a rerun with new shards computes
only those and appends them to the index. The summary counts images, skipped records by reason and
unreadable shards, and the throughput.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter

from blip2_ray.config import to_dict
from blip2_ray.errors import UserError
from blip2_ray.runtime.files import stale_temporaries, write_json_atomic
from blip2_ray.search import store
from blip2_ray.search.config import IndexJobConfig

# record-level skips that mean the whole shard could not be read
SHARD_SKIPS = ("truncated_shard", "empty_shard")


def plan(cfg: IndexJobConfig) -> tuple[list[str], list[str], dict]:
    """(all input shards, those still to compute, the model's identity). One sentence before any work for
    a missing model or source, or an output_dir holding an index of another model."""
    from blip2_ray.data.pipeline import resolve_sources

    identity = store.model_identity(cfg.model)
    files = resolve_sources(cfg.input, cfg.data)
    os.makedirs(os.path.join(cfg.output_dir, store.SHARDS_DIR), exist_ok=True)
    old = store.read_manifest(cfg.output_dir)
    if old is not None:
        store.same_model_or_error(old["model"], identity, cfg.output_dir)
    todo = []
    for f in files:
        done = store.shard_summary(cfg.output_dir, store.shard_id(f))
        if done is None:
            todo.append(f)
            for suffix in ("npy", "arrow", "json"):
                for stale in stale_temporaries(store.shard_file(cfg.output_dir, store.shard_id(f), suffix)):
                    os.remove(stale)
        elif done.get("model") != identity["fingerprint"]:
            raise UserError(f"shard {f!r} was indexed into {cfg.output_dir!r} with another model (weights "
                            f"{str(done.get('model'))[:12]}) than {identity['name']!r} "
                            f"({identity['fingerprint'][:12]}); use a new output_dir")
    return files, todo, identity


def _progress(n: int, total: int, s: dict, t0: float, images: int) -> None:
    rate = images / max(time.time() - t0, 1e-9)
    skipped = f", skipped {s['skipped']}" if s["skipped"] else ""
    print(f"[{n}/{total} shards] {os.path.basename(s['shard'])}: {s['images']} images{skipped}; "
          f"{rate:.1f} images/s so far", flush=True)


def run_index(cfg: IndexJobConfig) -> dict:
    """Compute the features of every input shard not done yet, build or grow the index; write and return
    the summary."""
    import ray

    from blip2_ray.data.sources import storage_options
    from blip2_ray.runtime.compute import actor_pool
    from blip2_ray.runtime.user_errors import report_user_errors, reraise_user_errors
    from blip2_ray.search.build import update_index
    from blip2_ray.search.worker import ShardIndexer

    t0 = time.time()
    files, todo, identity = plan(cfg)
    new: list[dict] = []
    if todo:
        d = cfg.data
        s3_opts = storage_options(d.s3_endpoint_url, d.s3_anonymous, d.s3_region)
        ds = ray.data.from_items([{"path": f, "model": identity["fingerprint"]} for f in todo],
                                 override_num_blocks=len(todo))
        ds = ds.map_batches(report_user_errors(ShardIndexer), fn_constructor_kwargs={"cfg": to_dict(cfg),
                                                                                    "s3_opts": s3_opts},
                            batch_size=1, batch_format="numpy", **actor_pool(cfg.compute, len(todo)))
        images, first = 0, None  # first: (time, images) when the first shard came back (start-up over)
        with reraise_user_errors():
            for row in ds.iter_rows():
                s = json.loads(row["summary"])
                new.append(s)
                images += s["images"]
                first = first or (time.time(), images)
                _progress(len(new), len(todo), s, t0, images)
    compute_s = time.time() - t0
    steady = None
    if len(new) > 1 and time.time() > first[0]:
        steady = round((images - first[1]) / (time.time() - first[0]), 2)
    summaries = [store.shard_summary(cfg.output_dir, store.shard_id(f)) for f in files]
    q, e = summaries[0]["num_queries"], summaries[0]["embed_dim"]
    data = {k: getattr(cfg.data, k) for k in ("image_keys", "caption_keys", "min_image_side", "max_image_pixels",
                                              "s3_endpoint_url", "s3_region", "s3_anonymous")}
    t1 = time.time()
    manifest = update_index(cfg.output_dir, files, cfg.index, identity, data, q, e)
    skipped, unreadable = Counter(), 0
    for s in summaries:
        skipped.update(s["skipped"])
        unreadable += int(any(s["skipped"].get(r) for r in SHARD_SKIPS))
    new_images = sum(s["images"] for s in new)
    size = os.path.getsize(os.path.join(cfg.output_dir, manifest["index_file"]))
    summary = {
        "shards": len(files), "shards_done_now": len(new), "shards_done_before": len(files) - len(new),
        "shards_unreadable": unreadable, "shards_in_index": len(manifest["shards"]),
        "images": manifest["num_images"], "images_now": new_images,
        "uncaptioned": sum(s.get("uncaptioned", 0) for s in summaries), "skipped": dict(sorted(skipped.items())),
        "kind": manifest["kind"], "factory": manifest["factory"], "params": manifest["params"],
        "index_bytes": size, "index_bytes_per_image": round(size / max(1, manifest["num_images"]), 1),
        "feature_seconds": round(compute_s, 2), "build_seconds": round(time.time() - t1, 2),
        "images_per_s": round(new_images / compute_s, 2) if new and compute_s > 0 else None,
        "images_per_s_after_first_shard": steady,
        "model": identity, "output_dir": os.path.abspath(cfg.output_dir),
    }
    write_json_atomic(cfg.summary_file or os.path.join(cfg.output_dir, "index_summary.json"), summary)
    return summary
