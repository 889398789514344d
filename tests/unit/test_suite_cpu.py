"""tools/suite_cpu.py: a command's CPU by process kind, its descendants included, other processes not."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"
# the tool samples every 0.05 s, and a busy machine can leave it unscheduled for longer: a pause after each burn
# (no CPU used) lets a sample see the burnt CPU before the process exits or says that the next test runs. Without
# it the CPU went to the wrong test on the loaded machine (a loaded `make test`, 2026-12-07: "a" 0.3 s, "b" 0.9 s)
SAMPLED = "time.sleep(1.0)\n"
# tests/conftest.py's writer of the current test's id (what the suite's processes run), as `say(text)`
SAY = f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\nfrom conftest import _say_current_test as say\n"


def test_descendants_are_counted_by_kind_and_the_exit_code_is_the_commands(tmp_path):
    child = tmp_path / "burn_child.py"
    child.write_text(BURN.format(s=0.6) + SAMPLED)
    parent = (f"import subprocess, sys\nsubprocess.run([sys.executable, {str(child)!r}])\n"
              + BURN.format(s=0.3) + SAMPLED + "sys.exit(3)\n")
    # a process beside it, not started by the command, burns too: it must not be counted
    bystander = subprocess.Popen([sys.executable, "-c", BURN.format(s=2.0)])
    try:
        out = subprocess.run([sys.executable, str(ROOT / "tools" / "suite_cpu.py"), "--interval", "0.05", "--",
                              sys.executable, "-c", parent], capture_output=True, text=True, timeout=60)
    finally:
        bystander.wait(timeout=30)
    assert out.returncode == 3, out.stderr
    head = re.search(r"\[suite_cpu\] ([\d.]+) CPU s in (\d+) processes", out.stdout)
    assert head, out.stdout
    total, procs = float(head.group(1)), int(head.group(2))
    assert procs == 2, out.stdout  # the command and its child, not the bystander
    assert 0.6 <= total < 1.8, out.stdout  # 0.9 s burnt (a process's last interval may be missed)
    assert re.search(r"\s2\s+[\d.]+\s+python", out.stdout), out.stdout


def test_by_test_gives_each_test_the_cpu_used_while_it_ran(tmp_path):
    # the command says which "test" runs through tests/conftest.py's writer, and burns 0.8 s in "a", then 0.4 s in "b"
    command = (SAY + "say('a')\n" + BURN.format(s=0.8) + SAMPLED + "say('b')\n" + BURN.format(s=0.4) + SAMPLED
               + "say('')\n")
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "suite_cpu.py"), "--interval", "0.05", "--by-test", "5",
                          "--", sys.executable, "-c", command], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {m.group(3): float(m.group(1)) for m in re.finditer(r"^\s*([\d.]+)\s+(\d+)  (\S+) \(", out.stdout, re.M)}
    assert set(rows) >= {"a", "b"}, out.stdout
    assert 0.6 <= rows["a"] <= 1.1 and 0.25 <= rows["b"] <= 0.6, out.stdout  # 0.8 s and 0.4 s, a sample's slack


def test_two_xdist_workers_can_say_their_tests_at_once(tmp_path):
    # `make test` runs two xdist workers, and under tools/suite_cpu.py both write the one file: with one shared ".tmp"
    # a worker's rename found the other's already moved (FileNotFoundError, an INTERNALERROR that stopped the run)
    writer = SAY + "for i in range(3000):\n    say(f'test {i}')\n"
    env = {**os.environ, "SUITE_CPU_TEST_FILE": str(tmp_path / "current")}
    procs = [subprocess.Popen([sys.executable, "-c", writer], env=env, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert (tmp_path / "current").read_text().startswith("test ")
