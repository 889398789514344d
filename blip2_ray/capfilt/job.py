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
    """One clear sentence before any actor starts if a model directory is missing."""
    for what, path, needed in (("filter.model", cfg.filter.model, True),
                               ("captioner.model", cfg.captioner.model, cfg.captioner.num_captions > 0)):
        if needed and not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{what} {path!r} is not a model export directory (no config.json); "
                            f"pass a directory written by the training job's export")


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
    for f in todo:  # temporaries of an interrupted earlier run (hidden, never read) are removed
        for stale in stale_temporaries(S.output_path(cfg.output_dir, f)):
            os.remove(stale)
    return files, todo


def summarize(files: list[str], cfg: CapFiltConfig, new: list[dict]) -> dict:
    """Totals over every shard (done now or by an earlier run)."""
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
        tot.update({k: r[k] for k in ("images", "generated", "kept", "kept_web", "images_with_web_kept")})
        skipped.update(r.get("skipped", {}))
    kept = tot["kept"]
    return {
        "shards": len(files), "shards_done_now": len(new), "shards_done_before": len(per_shard) - len(new),
        "images": tot["images"], "captions_generated": tot["generated"], "captions_kept": kept,
        "web_captions_kept": tot["kept_web"],
        "share_of_kept_that_are_web": (tot["kept_web"] / kept) if kept else 0.0,
        "share_of_images_keeping_web": (tot["images_with_web_kept"] / tot["images"]) if tot["images"] else 0.0,
        "skipped": dict(sorted(skipped.items())), "output_dir": os.path.abspath(cfg.output_dir),
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
