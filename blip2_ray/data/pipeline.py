"""Image-text shards -> Ray Data -> training batches, skipping and counting every bad record.

Stages (streaming):
  1. file list      resolve_sources: files of each source; per epoch a seeded permutation, mixed by weight,
                    one row per visit (EpochFiles, data/epoch_files.py: the epoch is read at each execution)
  2. read + decode  one read task per shard visit on CPU: tar members (streamed, grouped by key)
                    or parquet rows, then per chunk of decode_batch_size records: caption pick + clean,
                    image decode + checks, crop/flip/resize, Q-Former and LLM tokenisation; bad rows
                    dropped and counted; rows leave in blocks of ~output_block_mib while the file decodes
  3. Ray Train      each worker iterates its `get_dataset_shard` with `iter_train_batches`: fixed-size
                    batches (drop_last), a local shuffle buffer, TrainCollate -> torch tensors (pixels uint8)
Skip counts go to one named actor per Ray job (data/skips.py `SkipCounter`), readable from the driver and
from Train workers with `get_skip_counts(tag)`.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from typing import Iterator

import numpy as np
import ray
from ray.data.collate_fn import NumpyBatchCollateFn

from blip2_ray.config import from_dict
from blip2_ray.data.config import DataConfig
from blip2_ray.data.epoch_files import EpochFiles
from blip2_ray.data.epoch_plan import epoch_plan, unpack_records
from blip2_ray.data.readers import check_parquet_columns, read_shard_records
from blip2_ray.data.records import process_records, tokenizer_classes
from blip2_ray.data.skips import report_skips, skip_counter
from blip2_ray.data.sources import list_shards, shard_format, storage_options
from blip2_ray.runtime.user_errors import report_user_errors

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- sources
def resolve_sources(paths: list[str] | str, cfg: DataConfig) -> list[str]:
    """All shard files of `paths` (files, directories, globs, s3:// URIs), in order, duplicates dropped.

    Raises UserError (one sentence) when a path does not exist or holds no shard: before any work.
    """
    if isinstance(paths, str):
        paths = [paths]
    opts = _s3_opts(cfg)
    files: list[str] = []
    for p in paths:
        files.extend(f for f in _source_files(p, cfg, opts) if f not in files)
    return files


def _source_files(path: str, cfg: DataConfig, opts: dict) -> list[str]:
    files = list_shards(path, opts)
    # a misnamed parquet column fails here, before any work (one footer read per source)
    first_parquet = next((f for f in files if shard_format(f) == "parquet"), None)
    if first_parquet:
        check_parquet_columns(first_parquet, cfg.image_keys, cfg.caption_keys, opts)
    return files


def _s3_opts(cfg: DataConfig) -> dict:
    return storage_options(cfg.s3_endpoint_url, cfg.s3_anonymous, cfg.s3_region)


def epoch_file_order(per_source: list[list[str]], weights: list[float] | None, seed: int, epoch: int,
                     shuffle: bool = True) -> list[str]:
    """The files one epoch visits.

    Without weights every file once (seeded permutation per epoch when `shuffle`). With weights the
    epoch makes as many visits as there are files in all; each visit draws a source with probability
    weight / sum(weights) and takes that source's next file (cycling through a per-epoch permutation),
    so with shards of similar size the sources mix in proportion to their weights.
    """
    rng = np.random.default_rng([seed, epoch])
    orders = [list(rng.permutation(len(fs))) if shuffle else list(range(len(fs))) for fs in per_source]
    if weights is None:
        files = [per_source[s][i] for s, order in enumerate(orders) for i in order]
        return [files[i] for i in rng.permutation(len(files))] if shuffle else files
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    total = sum(len(fs) for fs in per_source)
    picks = rng.choice(len(per_source), size=total, p=w)
    nxt = [0] * len(per_source)
    out = []
    for s in picks:
        out.append(per_source[s][orders[s][nxt[s] % len(orders[s])]])
        nxt[s] += 1
    return out


# ------------------------------------------------------------------------------------------- dataset
class _ShardToRows:
    """The body of a read task (EpochFiles): one shard visit -> its model-ready rows, in batches.

    One task reads a file and decodes it in chunks of cfg.decode_batch_size records (process_records),
    so the raw image bytes never pass through the object store and memory stays bounded per chunk.
    (Two separate read and decode stages were fused by Ray Data into one operator that bundled
    `decode_batch_size` *files* per task: a single task decoded everything. bench/bench_data.py)
    The visit's `epoch` seeds every record's crop, flip and caption draw; records numbered in its `skip`
    bitmap (trained before a resume) are read past without decoding. Training rows carry "visit" and
    "record" (the record's position in its shard), which is how a checkpoint names what was trained.
    """

    def __init__(self, cfg: dict, s3_opts: dict, tag: str, train: bool, qformer_tokenizer: str | None,
                 llm_tokenizer: str | None, with_pixels: bool, plan_name: str | None, llm_family: str | None = None):
        self.cfg, self.s3_opts, self.tag, self.plan_name = from_dict(DataConfig, cfg), s3_opts, tag, plan_name
        self.train = train
        self.kw = dict(train=train, qformer_tokenizer_path=qformer_tokenizer, llm_tokenizer_path=llm_tokenizer,
                       llm_family=llm_family, with_pixels=with_pixels,
                       # the tokenizers' classes, found by the driver: a decode task loads them without torch
                       **tokenizer_classes(qformer_tokenizer, llm_tokenizer))

    def __call__(self, task: dict) -> Iterator[dict]:
        """`task`: {"visit", "path", "epoch", "skip", "generation"} of one visit (EpochFiles)."""
        c = self.cfg
        visit, path, epoch, generation = task["visit"], task["path"], task["epoch"], task["generation"]
        skips: Counter = Counter()

        def on_skip(reason: str) -> None:
            skips.update([reason])

        trained = unpack_records(task["skip"])
        records = read_shard_records(path, c.image_keys, c.caption_keys, on_skip, self.s3_opts)
        due = ((n, r) for n, r in enumerate(records) if not (n < len(trained) and trained[n]))
        good = decoded = 0
        for chunk in _chunks(due, c.decode_batch_size):
            out = process_records([r for _, r in chunk], c, on_skip=on_skip, epoch=epoch,
                                  record_numbers=[n for n, _ in chunk] if self.train else None, **self.kw)
            decoded += len(chunk)
            good += len(out["key"])
            if self.train:
                out["visit"] = np.full(len(out["key"]), visit, dtype=np.int64)
            if len(out["key"]):
                yield out
        report_skips(self.tag, skips)
        if self.plan_name is not None:  # waited on, like the skip counts: complete once the stream is consumed
            ray.get(epoch_plan(self.plan_name).visit_done.remote(epoch, visit, good + int(trained.sum()), decoded,
                                                                 generation))


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of `size` items (the last may be shorter), read lazily."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _epoch_visits(per_source: list[list[str]], weights: list[float] | None, seed: int, shuffle: bool,
                  epoch: int) -> list[str]:
    files = epoch_file_order(per_source, weights, seed, epoch, shuffle=shuffle)
    if weights is None:  # without mixing, a file named by two overlapping sources is read once
        files = list(dict.fromkeys(files))
    return files


def build_dataset(cfg: DataConfig, sources: list[str], *, train: bool, qformer_tokenizer: str | None,
                  llm_tokenizer: str | None, epoch: int = 0, skip_tag: str | None = None,
                  with_pixels: bool = True, plan_name: str | None = None,
                  llm_family: str | None = None) -> ray.data.Dataset:
    """A streaming Ray Dataset of model-ready rows from image-text shards.

    Rows: key (str), caption (str, cleaned), pixel_values uint8 (3, S, S) RGB (train: RandomResizedCrop
    + flip; eval: resize; uint8 keeps the object store traffic 4x below float32, and the consumer applies
    the CLIP mean/std: `transforms.normalize_pixels` / `normalize_pixels_tensor`), qformer_input_ids /
    qformer_attention_mask int64 (qformer_max_len) if `qformer_tokenizer`, llm_input_ids / llm_attention_mask
    int64 (llm_max_len) if `llm_tokenizer` (local tokenizer directories; `llm_family`, the LLM's model_type,
    decides how a caption ends: processor.tokenize_llm); for `train` also visit / record int64 (which shard
    visit of the epoch, which record of the shard). For `train` the file order is a permutation seeded by
    cfg.seed + the epoch, and several sources mix by cfg.weights (when `sources` is cfg.train). The epoch is
    `epoch`, or, with `plan_name` (an EpochPlan actor, data/epoch_plan.py), the plan's epoch at each
    execution, which also names the visits and records a resumed epoch skips.
    Bad records are dropped and counted under `skip_tag` (default "train"/"eval"): see data/skips.get_skip_counts.
    A missing path raises UserError now; a parquet file without the needed column raises UserError
    (naming file and column) when the dataset runs. `with_pixels=False` validates images but omits
    pixel_values (the data check).
    """
    from blip2_ray.config import to_dict

    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        from blip2_ray.errors import UserError

        raise UserError("no data sources given; set data.train / data.eval or pass paths")
    tag = skip_tag or ("train" if train else "eval")
    opts = _s3_opts(cfg)
    per_source = [_source_files(p, cfg, opts) for p in sources]
    weights = cfg.weights if (train and cfg.weights is not None and len(cfg.weights) == len(sources)) else None
    visits = functools.partial(_epoch_visits, per_source, weights, cfg.seed, train)
    skip_counter(create=True)
    if plan_name is not None:
        epoch_plan(plan_name, create=True)

    compute = ray.data.TaskPoolStrategy(size=cfg.decode_concurrency) if cfg.decode_concurrency else None
    # a UserError in a task (a parquet file without the configured column) reaches a driver that waits
    # inside runtime.user_errors.reraise_user_errors as itself
    udf = report_user_errors(_ShardToRows(to_dict(cfg), opts, tag, train, qformer_tokenizer, llm_tokenizer,
                                          with_pixels, plan_name, llm_family))
    # one read task per shard visit, reading and decoding it: the files spread over the CPUs
    ds = ray.data.read_datasource(EpochFiles(visits, epoch, plan_name, udf), num_cpus=cfg.num_cpus_per_decode_task,
                                  compute=compute, override_num_blocks=max(1, len(visits(epoch))))
    # This dataset's own context (not the process-wide one). With Ray Data's 128 MiB default a task
    # held a shard's decoded rows (~180 MB for 1,200 images at 224 px) until 128 MiB or its end, so
    # the first batch came after 4-5 s instead of 0.5 s (bench/bench_data.py shards, 2 CPUs).
    ds.context.target_max_block_size = int(cfg.output_block_mib * (1 << 20))
    return ds


# ---------------------------------------------------------------------------------------- Ray Train
TENSOR_COLUMNS = ("pixel_values", "qformer_input_ids", "qformer_attention_mask", "llm_input_ids",
                  "llm_attention_mask", "llm_prompt_length")
POSITION_COLUMNS = ("visit", "record")


class TrainCollate(NumpyBatchCollateFn):
    """numpy batch -> {tensor columns: torch tensors (those present), "key"/"caption": list[str], visit/record: numpy}.

    pixel_values stay uint8 (4x less to copy and pin than float32): the consumer normalises them on its
    device with `transforms.normalize_pixels_tensor`. With `pin_memory` the tensors land in pinned host
    memory (CUDA only), so the copy to the GPU can run asynchronously.
    """

    def __init__(self, pin_memory: bool = False):
        super().__init__()
        self.pin_memory = pin_memory

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        import torch

        out: dict = {name: torch.from_numpy(np.ascontiguousarray(batch[name]))
                     for name in TENSOR_COLUMNS if name in batch}
        if self.pin_memory:
            out = {k: v.pin_memory() for k, v in out.items()}
        out.update({name: np.asarray(batch[name]) for name in POSITION_COLUMNS if name in batch})
        out["key"] = [str(k) for k in batch["key"]]
        if "caption" in batch:
            out["caption"] = [str(c) for c in batch["caption"]]
        return out


def iter_train_batches(shard, batch_size: int, cfg: DataConfig, *, epoch: int = 0,
                       prefetch_batches: int | None = None, shuffle: bool = True,
                       pin_memory: bool = False) -> Iterator[dict]:
    """A Ray Train worker's batches from its `ray.train.get_dataset_shard(...)` (TrainCollate's dicts).

    Every batch has exactly `batch_size` rows on every rank (drop_last: ITC needs equal batches).
    """
    return shard.iter_torch_batches(
        batch_size=batch_size,
        drop_last=True,
        local_shuffle_buffer_size=(cfg.shuffle_buffer or None) if shuffle else None,
        local_shuffle_seed=cfg.seed + epoch if shuffle else None,
        collate_fn=TrainCollate(pin_memory=pin_memory),
        prefetch_batches=cfg.prefetch_batches if prefetch_batches is None else prefetch_batches,
    )
