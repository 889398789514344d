"""Test hooks of the training worker, installed through the config's `fault_injection` section (off by default).

The step loop (train/loop.py) knows only `StepHooks`: it calls `before_step` before each optimizer step and
`after_micro_batch` after each micro batch trained. `step_hooks` builds them from the config:

    pid_dir           the last rank writes its pid before step `at_step` (once per pid_dir) and sleeps `pause_s`,
                      the window in which a test kills the worker (or its node) to exercise a restart
    trained_keys_dir  every rank appends one line per trained row: "<run start step> <step> <epoch> <key>
                      <crc32 of its uint8 pixels>", from which a test checks that no row trains twice
"""

from __future__ import annotations

import os
import time
import zlib
from typing import Callable

from blip2_ray.train.config import PretrainConfig


class StepHooks:
    """Callbacks of the step loop; none by default."""

    def __init__(self, before_step: list[Callable[[int], None]] | None = None,
                 after_micro_batch: list[Callable[[int, int, dict], None]] | None = None):
        self._before, self._after = before_step or [], after_micro_batch or []

    def before_step(self, step: int) -> None:
        """`step`: the optimizer steps done so far."""
        for hook in self._before:
            hook(step)

    def after_micro_batch(self, step: int, epoch: int, batch: dict) -> None:
        """`step`: the optimizer step the micro batch belongs to (1-based)."""
        for hook in self._after:
            hook(step, epoch, batch)


def step_hooks(cfg: PretrainConfig, rank: int, world: int, start_step: int) -> StepHooks:
    """The hooks `cfg.fault_injection` asks for on this rank of a run that (re)started at `start_step`."""
    fi = cfg.fault_injection
    before, after = [], []
    if fi.pid_dir and rank == world - 1:
        def pause(step: int) -> None:
            if step + 1 == fi.at_step:
                write_pid_once(fi.pid_dir, fi.pause_s)

        before.append(pause)
    if fi.trained_keys_dir:
        def record(step: int, epoch: int, batch: dict) -> None:
            write_trained_keys(fi.trained_keys_dir, rank, start_step, step, epoch, batch)

        after.append(record)
    return StepHooks(before, after)


def write_trained_keys(directory: str, rank: int, start_step: int, step: int, epoch: int, batch: dict) -> None:
    """One line per trained row, "<run start step> <step> <epoch> <key> <crc32 of its uint8 pixels>"."""
    os.makedirs(directory, exist_ok=True)
    pixels = batch["pixel_values"].cpu().numpy()
    with open(os.path.join(directory, f"rank{rank}.txt"), "a") as f:
        for i, key in enumerate(batch["key"]):
            f.write(f"{start_step} {step} {epoch} {key} {zlib.crc32(pixels[i].tobytes())}\n")


def write_pid_once(pid_dir: str, pause_s: float) -> None:
    """Write this process's pid to <pid_dir>/worker.pid unless it exists, then sleep `pause_s`."""
    path = os.path.join(pid_dir, "worker.pid")
    if os.path.exists(path):
        return
    os.makedirs(pid_dir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(pause_s)
