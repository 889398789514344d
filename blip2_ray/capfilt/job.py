"""CapFilt as a Ray Data batch job: one shard per actor call, an actor pool holding both models.

Resumable at shard granularity: a shard whose output exists under its final name is done (outputs are
written to a temporary name and renamed), so a rerun processes only the rest. The summary sums the
per-shard counts (each shard's are kept beside it as `<shard>.capfilt.json`).
"""

from __future__ import annotations

import json
import os
from collections import Counter

from blip2_ray.capfilt import shards as S
from blip2_ray.capfilt.config import CapFiltConfig
from blip2_ray.config import to_dict
from blip2_ray.errors import UserError
from blip2_ray.runtime.files import stale_temporaries, write_json_atomic


def check_models(cfg: CapFiltConfig) -> None:
    """One clear sentence before any actor starts if a model directory is missing, incomplete (no weights,
    processor or tokenizer) or holds another model than its kind needs (config.json's model_type/architectures)."""
    from blip2_ray.capfilt.captioners import check_captioner
    from blip2_ray.capfilt.filters import check_filter

    check_filter(cfg.filter)
    check_captioner(cfg.captioner)


def plan(cfg: CapFiltConfig) -> tuple[list[str], list[str]]:
    """(all input shards, those still to do). UserError on a missing source or two inputs of one name."""
    from blip2_ray.data.pipeline import resolve_sources

    files = resolve_sources(cfg.input, cfg.data)
    names = Counter(os.path.basename(f) for f in files)
    dup = [n for n, c in names.items() if c > 1]
    if dup:
        raise UserError(f"two input shards are both named {dup[0]!r}; CapFilt writes outputs by file name, "
                        f"so run the sources into separate output_dirs")
    os.makedirs(cfg.output_dir, exist_ok=True)
    todo = [f for f in files if not os.path.exists(S.output_path(cfg.output_dir, f))]
    check_same_models([f for f in files if f not in todo], cfg)
    for f in todo:  # temporaries of an interrupted earlier run (hidden, never read) are removed
        for stale in stale_temporaries(S.output_path(cfg.output_dir, f)):
            os.remove(stale)
    return files, todo


def check_same_models(done: list[str], cfg: CapFiltConfig) -> None:
    """UserError if a finished shard in output_dir was written by other models than `cfg` names: a resumed
    run must not mix two captioner/filter pairs in one output (its provenance would no longer hold)."""
    from blip2_ray.capfilt.worker import provenance

    want = provenance(cfg)
    for f in done:
        side = S.output_path(cfg.output_dir, f) + ".capfilt.json"
        if os.path.exists(side):
            with open(side) as fh:
                got = json.load(fh).get("models")
            if got is not None and got != want:
                raise UserError(f"{cfg.output_dir!r} already holds {os.path.basename(f)} written by {got}, not by "
                                f"{want}; use a new output_dir for another model pair (or delete those shards)")


def summarize(files: list[str], cfg: CapFiltConfig, new: list[dict]) -> dict:
    """Totals over every shard (done now or by an earlier run)."""
    from blip2_ray.capfilt.worker import SHARD_COUNTS, provenance

    per_shard = {r["shard"]: r for r in new}
    for f in files:
        if f not in per_shard:
            side = S.output_path(cfg.output_dir, f) + ".capfilt.json"
            if os.path.exists(side):
                with open(side) as fh:
                    per_shard[f] = json.load(fh)
    tot: Counter = Counter()
    skipped: Counter = Counter()
    for r in per_shard.values():
        tot.update({k: r.get(k, 0) for k in SHARD_COUNTS})
        skipped.update(r.get("skipped", {}))
    kept = tot["kept"]
    return {
        "shards": len(files), "shards_done_now": len(new), "shards_done_before": len(per_shard) - len(new),
        "images": tot["images"], "captions_generated": tot["generated"], "captions_kept": kept,
        "web_captions_kept": tot["kept_web"], "captions_truncated": tot["truncated"],
        "share_of_kept_that_are_web": (tot["kept_web"] / kept) if kept else 0.0,
        "share_of_images_keeping_web": (tot["images_with_web_kept"] / tot["images"]) if tot["images"] else 0.0,
        "skipped": dict(sorted(skipped.items())), "models": provenance(cfg),
        "output_dir": os.path.abspath(cfg.output_dir),
    }


def run_capfilt(cfg: CapFiltConfig) -> dict:
    """Process every input shard not done yet; write and return the summary."""
    import ray

    from blip2_ray.capfilt.worker import CapFiltWorker
    from blip2_ray.runtime.compute import actor_pool
    from blip2_ray.runtime.user_errors import report_user_errors, reraise_user_errors

    check_models(cfg)
    files, todo = plan(cfg)
    new: list[dict] = []
    if todo:
        ds = ray.data.from_items([{"path": f} for f in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(report_user_errors(CapFiltWorker), fn_constructor_kwargs={"cfg": to_dict(cfg)},
                            batch_size=1, batch_format="numpy", **actor_pool(cfg.compute, len(todo)))
        with reraise_user_errors():
            new = [json.loads(r["summary"]) for r in ds.iter_rows()]
    summary = summarize(files, cfg, new)
    write_json_atomic(cfg.summary_file or os.path.join(cfg.output_dir, "capfilt_summary.json"), summary)
    return summary
