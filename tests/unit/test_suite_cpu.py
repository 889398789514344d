"""tools/suite_cpu.py: a command's CPU by process kind, its descendants included, other processes not."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_descendants_are_counted_by_kind_and_the_exit_code_is_the_commands(tmp_path):
    child = tmp_path / "burn_child.py"
    child.write_text(BURN.format(s=0.6))
    parent = (f"import subprocess, sys\nsubprocess.run([sys.executable, {str(child)!r}])\n"
              + BURN.format(s=0.3) + "sys.exit(3)\n")
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
