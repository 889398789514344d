"""A Train worker's micro batches: one epoch after another from its dataset shard, fetched in a background
thread (so a wait that never ends becomes an error with a diagnosis), moved to the device and normalised there.

    epoch_batches   rank 0 writes each epoch into the run's EpochPlan (data/epoch_plan.py) before the epoch's
                    iteration starts, then every rank iterates its shard: (epoch, batch) forever
    on_device       in that thread too: each batch made ready for the step while the previous step runs (its
                    tensors copied from pinned memory, non_blocking, on a side CUDA stream; pixels normalised
                    there; per-row work such as retrieval image ids done here, not in the training thread)
    BatchFeed       runs that generator in a thread; `next()` waits at most data.stall_timeout_s
    to_device       the step's (pixels, ids, mask) on the device: the prepared tensors (the training thread's
                    stream waits for their copy on the device, not on the host), or uint8 pixels -> device ->
                    CLIP-normalised float32
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from typing import Callable, Iterator

import torch

from blip2_ray.errors import UserError
from blip2_ray.train.config import PretrainConfig
from blip2_ray.train.data_position import DataPosition


class DataStallError(UserError):
    """A training worker received no batch for data.stall_timeout_s; the message says what it waited for."""


def epoch_batches(cfg: PretrainConfig, shard, plan, rank: int, start: DataPosition,
                  pin_memory: bool = False) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) forever from this worker's dataset shard, from `start` on.

    `plan` is the run's EpochPlan actor: rank 0 tells it the epoch (and, for the resumed epoch, the visits
    and records `start` says were trained) before iterating; streaming_split holds the other ranks until
    every rank asked for the epoch, so the execution reads this plan.
    """
    import ray

    from blip2_ray.data.pipeline import iter_train_batches

    epoch, resumed = start.epoch, bool(start.consumed or start.partial)
    while True:
        if rank == 0:
            consumed, partial = (sorted(start.consumed), start.partial) if epoch == start.epoch else ([], {})
            ray.get(plan.begin.remote(epoch, consumed, partial))
        n = 0
        for batch in iter_train_batches(shard, cfg.train.micro_batch_size, cfg.data, epoch=epoch,
                                        pin_memory=pin_memory):
            n += 1
            yield epoch, batch
        if n == 0 and not (resumed and epoch == start.epoch):  # a resumed epoch may have nothing left
            raise RuntimeError("the training data gave this worker no full micro batch; add data or lower "
                               "train.micro_batch_size")
        epoch += 1


class BatchFeed:
    """Items of `source` produced in a background thread; `next()` waits at most `timeout_s` (0: forever).

    On a timeout `next()` raises `on_stall(waited_s)`. An exception in the source is raised by `next()`.
    """

    def __init__(self, source: Iterator, timeout_s: float, on_stall: Callable[[float], Exception]):
        self._source, self._timeout, self._on_stall = source, timeout_s, on_stall
        self._queue: queue.Queue = queue.Queue(maxsize=1)  # Ray Data prefetches; one more batch is enough
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="batch-feed", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._source:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as e:  # handed to the consumer, raised there
            self._put(("error", e))

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.monotonic()
        try:
            kind, value = self._queue.get(timeout=self._timeout or None)
        except queue.Empty:
            raise self._on_stall(time.monotonic() - t0) from None
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        return value

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop producing (the thread ends at its next item; it is a daemon if the source blocks)."""
        self._stop.set()
        self._thread.join(timeout_s)


ON_DEVICE = "on_device"  # a prepared batch's tensors on the device (pixel_values as normalised "pixels")
READY = "ready"  # the CUDA event its copy recorded on the side stream


def on_device(source: Iterator[tuple[int, dict]], cfg: PretrainConfig, device: torch.device,
              host_tensors=None) -> Iterator[tuple[int, dict]]:
    """(epoch, batch) of `source` with each batch prepared by `prepare_batch` (run it in BatchFeed's thread: the
    next batch is then prepared while the training thread runs the current step)."""
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    for epoch, batch in source:
        yield epoch, prepare_batch(batch, cfg, device, stream, host_tensors)


def prepare_batch(batch: dict, cfg: PretrainConfig, device: torch.device, stream=None, host_tensors=None) -> dict:
    """`batch` plus its tensors on `device` (batch[ON_DEVICE]): copied non_blocking (from pinned memory where
    the batch is pinned) on `stream`, pixels normalised there; the task's own host tensors (TaskSpec.host_tensors)
    computed here. The host tensors stay (the trained-rows test hook reads them)."""
    from blip2_ray.data.transforms import normalize_pixels_tensor

    host = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if host_tensors is not None:
        pinned = host["pixel_values"].is_pinned()
        for k, v in host_tensors(batch).items():  # the task's own (TaskSpec.host_tensors), e.g. retrieval's image ids
            host[k] = v.pin_memory() if pinned else v
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        moved = {k: v.to(device, non_blocking=True) for k, v in host.items()}
        moved["pixels"] = normalize_pixels_tensor(moved.pop("pixel_values"))
        ready = None
        if stream is not None:
            ready = torch.cuda.Event()
            ready.record(stream)
    return {**batch, ON_DEVICE: moved, READY: ready}


def check_retrieval_batch(image_ids: torch.Tensor, num_workers: int) -> None:
    """At one worker the micro batch is the global batch: ITM's hard negatives need a second image in it."""
    if num_workers == 1 and image_ids.numel() > 1 and bool((image_ids == image_ids[0]).all()):
        raise UserError(f"every row of a micro batch of {image_ids.numel()} shows the same image, so ITM has no "
                        f"negative image to draw; raise train.micro_batch_size or data.shuffle_buffer")


def device_tensors(batch: dict, device: torch.device, cfg: PretrainConfig | None = None) -> dict[str, torch.Tensor]:
    """The batch's tensors on `device`: those `prepare_batch` moved (the current CUDA stream waits for their copy
    on the device, and they are recorded as used by it), else prepared now, in this thread."""
    moved = batch.get(ON_DEVICE)
    if moved is None:
        batch.update(prepare_batch(batch, cfg, device))
        moved = batch[ON_DEVICE]
    ready = batch.pop(READY, None)
    if ready is not None:
        current = torch.cuda.current_stream(device)
        current.wait_event(ready)
        for t in moved.values():
            t.record_stream(current)
    return moved


def to_device(batch: dict, device: torch.device, stage: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixel_values float32 CLIP-normalised, input_ids, attention_mask) of the stage, on `device`.

    The pixels cross to the device as uint8 (pinned when the batch is) and are normalised there.
    """
    prefix = "qformer" if stage == 1 else "llm"
    moved = device_tensors(batch, device)
    return moved["pixels"], moved[f"{prefix}_input_ids"], moved[f"{prefix}_attention_mask"]


def stall_message(cfg: PretrainConfig, waited_s: float, rank: int, step: int, epoch: int) -> str:
    """The diagnosis of a worker that waited `waited_s` for a batch: what it waited for, what the cluster has."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()

    def amount(key: str) -> str:
        t = total.get(key, 0.0)
        return f"{t - free.get(key, 0.0):g} of {t:g} used"

    res = f"CPU {amount('CPU')}" + (f", GPU {amount('GPU')}" if total.get("GPU") else "")
    gib = 1 << 30
    store = f"object store {(total.get('object_store_memory', 0) - free.get('object_store_memory', 0)) / gib:.1f} " \
            f"of {total.get('object_store_memory', 0) / gib:.1f} GiB used"
    return (f"training worker {rank} received no batch for {waited_s:.0f} s (data.stall_timeout_s="
            f"{cfg.data.stall_timeout_s:g}) at step {step}, epoch {epoch}: it waits for Ray Data's decode tasks "
            f"(data.num_cpus_per_decode_task={cfg.data.num_cpus_per_decode_task:g} CPU each) to deliver rows; the "
            f"cluster has {res}, {store}, and the {cfg.scaling.num_workers} workers hold "
            f"scaling.cpus_per_worker={cfg.scaling.cpus_per_worker:g} CPU each; if fewer CPUs are free than a decode "
            f"task needs, lower scaling.cpus_per_worker or data.num_cpus_per_decode_task, if the storage is just "
            f"slow raise data.stall_timeout_s")
