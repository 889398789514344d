"""Where a command's CPU goes, by process kind: the command and every process it starts (Ray's workers, raylet,
GCS, Java...), sampled from /proc. Linux only.

    python tools/suite_cpu.py [--interval 0.2] [--top 30] -- .venv/bin/python -m pytest -q tests

Processes are recognised by a tag in their environment (inherited by every descendant, Ray's workers included),
so other work on the machine is not counted. A Ray worker is counted under its last title (`ray::RayTrainWorker`,
`ray::MapWorker`, ...; `ray::IDLE` only if it never ran anything). A process that lives less than one interval
may be missed; its CPU is then not counted. Prints one table (CPU seconds, processes, seconds per process) and
the command's exit code is this one's.

`--by-test N` also prints the N most expensive tests: the command is given a file (`SUITE_CPU_TEST_FILE`)
into which tests/conftest.py writes the id of the test that runs; CPU used between two samples goes to the
test named then (a session fixture's start-up to the test that first needs it), and a process to the test
during which it was first seen. One test runs at a time only without xdist: under `-n 2` both workers write the
file and the CPU goes to whichever test started or ended last (use `--by-test` without `-n`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter

TAG = "SUITE_CPU_TAG"
TEST_FILE = "SUITE_CPU_TEST_FILE"
HZ = os.sysconf("SC_CLK_TCK")


def kind(cmdline: str) -> str:
    m = re.search(r"ray::([\w.]+)", cmdline)
    if m:
        return f"ray::{m.group(1)}"
    if re.search(r"(^|\s)(-m pytest|\S*/pytest|pytest)(\s|$)", cmdline):
        return "pytest"
    for name in ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "java", "cc1plus",
                 "ninja", "ray start"):
        if name in cmdline:
            return name
    return os.path.basename(cmdline.split(" ")[0]) or "?"


def read(pid: str) -> tuple[str, float] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline") as f:
            cmdline = f.read().replace("\0", " ").strip()
        return cmdline, (int(fields[11]) + int(fields[12])) / HZ
    except (OSError, IndexError, ValueError):
        return None


def tagged(pid: str, tag: str) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"{TAG}={tag}".encode() in f.read()
    except OSError:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    p.add_argument("--top", type=int, default=30, help="rows to print")
    p.add_argument("--by-test", type=int, default=0, metavar="N", help="also the N tests that cost the most CPU")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to measure after --")
    tag = uuid.uuid4().hex
    test_file = f"/tmp/suite_cpu_{tag}.test"
    t0 = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, TAG: tag, TEST_FILE: test_file})
    procs: dict[str, list] = {}  # pid -> [kind, cpu seconds]
    by_test: dict[str, list] = {}  # test id -> [cpu seconds, processes first seen, Counter of cpu by kind]
    while True:
        done = child.poll() is not None
        test = current_test(test_file)
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            if pid not in procs and not tagged(pid, tag):
                continue
            got = read(pid)
            if got is None:
                continue
            cmdline, cpu = got
            now = kind(cmdline) if cmdline else "?"  # an exited process (a zombie) has no command line
            row = by_test.setdefault(test, [0.0, 0, Counter()])
            if pid not in procs:
                row[1] += 1
            entry = procs.setdefault(pid, [now, 0.0])
            if now != "?" and not (now == "ray::IDLE" and entry[0].startswith("ray::")):
                entry[0] = now  # a worker keeps the last task it ran, a zombie the kind it had
            row[0] += cpu - entry[1]
            row[2][entry[0]] += cpu - entry[1]
            entry[1] = cpu
        if done:
            break
        time.sleep(args.interval)
    wall = time.perf_counter() - t0
    seconds, count = Counter(), Counter()
    for k, cpu in procs.values():
        seconds[k] += cpu
        count[k] += 1
    total = sum(seconds.values())
    print(f"\n[suite_cpu] {total:.1f} CPU s in {len(procs)} processes over {wall:.1f} s wall "
          f"({total / wall:.2f} cores busy on average); exit code {child.returncode}")
    print(f"{'CPU s':>9} {'share':>6} {'procs':>6} {'s/proc':>7}  kind")
    for k, s in seconds.most_common(args.top):
        print(f"{s:9.1f} {s / total:6.1%} {count[k]:6d} {s / count[k]:7.2f}  {k}")
    if args.by_test:
        print(f"\n{'CPU s':>9} {'procs':>6}  test (its three largest kinds)")
        for test, (cpu, started, kinds) in sorted(by_test.items(), key=lambda kv: -kv[1][0])[:args.by_test]:
            top = ", ".join(f"{k} {v:.1f}" for k, v in kinds.most_common(3))
            print(f"{cpu:9.1f} {started:6d}  {test} ({top})")
    if os.path.exists(test_file):
        os.remove(test_file)
    return child.returncode


def current_test(path: str) -> str:
    """The test the command says runs now (tests/conftest.py writes it), or "(between tests)"."""
    try:
        with open(path) as f:
            return f.read().strip() or "(between tests)"
    except OSError:
        return "(between tests)"


if __name__ == "__main__":
    sys.exit(main())
