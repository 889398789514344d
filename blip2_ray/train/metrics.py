"""What a Train worker reports at each log step: losses, throughput, data wait, memory peaks, residency.

Loss components are summed as detached device tensors per micro step and read once per log step (one
device sync per log step, not per micro step). Means over ranks for losses and times; maxima over ranks
for memory peaks and the held fraction of the frozen parameters (the worst worker is what runs out); the
peaks of every worker as lists too (`*_per_worker`, in rank order).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time

import torch

from blip2_ray.model.partitioned import held_numel
from blip2_ray.train.config import PretrainConfig

log = logging.getLogger(__name__)
GIB = float(1 << 30)


class LossWindow:
    """Sums over the steps since the last report."""

    def __init__(self):
        self.steps, self.time, self.wait, self.micro_steps = 0, 0.0, 0.0, 0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, out: dict) -> None:
        """One micro step's losses ("loss" and "loss_*" tensors), kept on their device: no sync here."""
        self.micro_steps += 1
        for k, v in out.items():
            if k.startswith("loss"):
                v = v.detach().float().reshape(())
                self.sums[k] = self.sums[k] + v if k in self.sums else v

    def metrics(self, cfg: PretrainConfig, engine, step: int, epoch: int) -> dict:
        """The report of this window: averaged over ranks (losses, times), max over ranks (memory)."""
        import torch.distributed as dist

        keys = sorted(self.sums)
        dev = engine.device
        mean = torch.stack([self.sums[k].to(dev) / max(self.micro_steps, 1) for k in keys]
                           + [torch.tensor(self.wait, device=dev), torch.tensor(self.time, device=dev)]).double()
        peak = torch.tensor([host_peak_rss_gib(), device_peak_gib(dev), frozen_fraction_held(engine.module)],
                            dtype=torch.float64, device=dev)
        per_worker = [peak]
        if dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
            per_worker = [torch.empty_like(peak) for _ in range(dist.get_world_size())]
            dist.all_gather(per_worker, peak)
            peak = torch.stack(per_worker).amax(0)
        mean, peak = mean.tolist(), peak.tolist()  # the one device sync of the window
        per_worker = [p.tolist() for p in per_worker]
        out = dict(zip(keys, mean[: len(keys)]))
        wait, elapsed = mean[-2], max(mean[-1], 1e-9)
        out.update(
            step=step, epoch=epoch, lr=float(engine.get_lr()[0]),
            samples_per_s=cfg.train.global_batch_size * self.steps / elapsed,
            steps_per_s=self.steps / elapsed,
            data_wait_fraction=wait / elapsed,
            peak_host_rss_gib=peak[0],
            peak_host_rss_gib_per_worker=[p[0] for p in per_worker],
            frozen_param_fraction_held=peak[2],
            skipped_records=skipped_records(),
        )
        regions = getattr(engine.module, "compiled_regions", None)  # train.compile (train/compile_step.py)
        out["compile_mode"] = "off" if regions is None else regions.mode  # "run": compiled; "eager": fell back
        out["compile_s"] = None if regions is None else regions.warm_up_s
        if dev.type == "cuda":
            out["peak_device_memory_gib"] = peak[1]
            out["peak_device_memory_gib_per_worker"] = [p[1] for p in per_worker]
        return out


def host_peak_rss_gib() -> float:
    """The peak resident memory of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def trace_memory(phase: str) -> None:
    """Opt-in (env BLIP2_MEMORY_TRACE=<file>): append "<pid> <phase> rss <GiB> peak <GiB>" to that file."""
    path = os.environ.get("BLIP2_MEMORY_TRACE")
    if not path:
        return
    rss = 0.0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / (1 << 20)
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {phase} rss {rss:.3f} peak {host_peak_rss_gib():.3f}\n")


PHASES = ("data", "forward", "backward", "step", "metrics", "report")


class StepPhases:
    """Host seconds between consecutive trace points, summed per phase (a point's last word: the phase it ends).

    The worker's points (train/loop.py): "step N data" (the batch handed over), "... forward", "... backward",
    "... step" (the optimizer: DeepSpeed's step), "... metrics" (the loss window, the trained rows) and, at a log
    step, "... report" (metrics over ranks, the report and checkpoint). Host time: on a GPU, what the host spent
    issuing each phase (a phase that waits for the device shows the wait).
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock  # wall time; a benchmark on a shared CPU may count the thread's CPU time instead
        self.last: float | None = None
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.counts = dict.fromkeys(PHASES, 0)

    def mark(self, phase: str) -> None:
        now = self.clock()
        if self.last is not None:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
            self.counts[phase] = self.counts.get(phase, 0) + 1
        self.last = now

    def take(self) -> dict:
        """{"seconds": {phase: s}, "counts": {phase: n}} since the last take; then starts again."""
        out = {"seconds": dict(self.seconds), "counts": dict(self.counts)}
        self.seconds, self.counts = dict.fromkeys(PHASES, 0.0), dict.fromkeys(PHASES, 0)
        return out


STEP_PHASES = StepPhases()  # this process's (a Train worker runs one loop)


def trace_step(point: str) -> None:
    """A trace point of the worker's step ("step N <phase>"): the memory trace (BLIP2_MEMORY_TRACE) and the host
    seconds since the previous point, summed under <phase>. With BLIP2_STEP_PROFILE=<file>, every "report" point
    appends the window's sums to that file as one JSON line (pid, step, seconds and counts per phase)."""
    trace_memory(point)
    phase = point.rsplit(" ", 1)[-1]
    STEP_PHASES.mark(phase)
    path = os.environ.get("BLIP2_STEP_PROFILE")
    if path and phase == "report":
        line = {"pid": os.getpid(), "step": int(point.split()[1]), **STEP_PHASES.take()}
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")


def device_peak_gib(device: torch.device) -> float:
    """torch.cuda.max_memory_allocated of the device so far (0 on CPU)."""
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else 0.0


def frozen_fraction_held(module: torch.nn.Module) -> float:
    """Elements of the frozen parameters this rank holds now / their full size (ZeRO-3: about 1/world).

    ZeRO-3 builds the frozen parts partitioned (train/zero3.py), so this is also what the worker held
    while building them (plus one module at a time); the peak host RSS metric is the measured truth.
    """
    held, total = held_numel(module)
    return held / max(total, 1)


_SKIP_COUNT_FAILED = []


def skipped_records() -> int | None:
    """Records the training data dropped so far (all reasons); None, with the error logged once, when the
    count cannot be read (a number would hide that the counter is broken); None without Ray."""
    import ray

    from blip2_ray.data.skips import get_skip_counts

    if not ray.is_initialized():
        return None
    try:
        return int(sum(get_skip_counts("train").values()))
    except Exception:
        if not _SKIP_COUNT_FAILED:
            _SKIP_COUNT_FAILED.append(True)
            log.exception("cannot read the skipped-record counts; reporting skipped_records=None from now on")
        return None


def tensorboard(cfg: PretrainConfig):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    os.makedirs(cfg.tensorboard_path, exist_ok=True)
    return SummaryWriter(cfg.tensorboard_path)


def log_step(cfg: PretrainConfig, writer, m: dict) -> None:
    """The progress line (rank 0) and the TensorBoard scalars."""
    losses = " ".join(f"{k.removeprefix('loss_')} {m[k]:.3f}" for k in sorted(m) if k.startswith("loss_"))
    device = f" device peak {m['peak_device_memory_gib']:.2f} GiB" if "peak_device_memory_gib" in m else ""
    skipped = "?" if m["skipped_records"] is None else m["skipped_records"]
    print(f"[stage{cfg.stage}] step {m['step']}/{cfg.train.max_steps} loss {m['loss']:.4f} ({losses}) "
          f"lr {m['lr']:.2e} {m['samples_per_s']:.1f} samples/s data-wait {100 * m['data_wait_fraction']:.0f}% "
          f"host peak {m['peak_host_rss_gib']:.2f} GiB{device} skipped {skipped}", flush=True)
    if writer is not None:
        for k, v in m.items():
            if isinstance(v, (int, float)) and k != "step":
                writer.add_scalar(f"train/{k}", v, m["step"])
        writer.flush()
