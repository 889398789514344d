"""A line at least every `every_s` seconds while a job works silently (model build, first batch, export).

`Heartbeat` runs one daemon thread: whenever nothing was said for `every_s` seconds it prints what the job is
doing now and for how long. The job names its phase (`phase`) and calls `said` when it printed a line of its
own, so a job that reports regularly prints no extra lines. Ray-free.
"""

from __future__ import annotations

import threading
import time


class Heartbeat:
    def __init__(self, prefix: str, every_s: float = 25.0, out=print, enabled: bool = True, clock=time.monotonic):
        self.prefix, self.every_s, self.out, self.enabled, self.clock = prefix, every_s, out, enabled, clock
        self._phase, self._phase_start = "starting", clock()
        self._last = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def phase(self, what: str) -> None:
        """What the job does from now on (said in the next heartbeat line, with its duration so far)."""
        with self._lock:
            self._phase, self._phase_start = what, self.clock()

    def said(self) -> None:
        """The job printed a line of its own just now."""
        with self._lock:
            self._last = self.clock()

    def tick(self) -> str | None:
        """Print the heartbeat line if nothing was said for `every_s` seconds; the line printed, or None."""
        with self._lock:
            now = self.clock()
            if now - self._last < self.every_s:
                return None
            self._last = now
            line = f"{self.prefix}{self._phase} ({now - self._phase_start:.0f} s so far)"
        self.out(line, flush=True)
        return line

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.every_s)):
            self.tick()
