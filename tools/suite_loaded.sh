#!/usr/bin/env bash
# A pytest command on a loaded machine, as issue 22 measures the suite: one CPU-bound process beside it for the
# whole run (started first, stopped after). Prints pytest's last line, then "rc N wall S".
#
#   tools/suite_loaded.sh [pytest arguments]      e.g. tools/suite_loaded.sh -q -n 2 --dist loadfile tests/integration
#
# Run from the project root, after `make install`. Environment variables given to it reach the suite (settings that
# tests/conftest.py only defaults, such as OMP_NUM_THREADS, can be compared this way).
set -u
cd "$(dirname "$0")/.."
python3 -c "while True: pass" &
burner=$!
trap 'kill $burner 2>/dev/null' EXIT
t0=$(date +%s.%N)
DS_ACCELERATOR=cpu .venv/bin/python -m pytest "$@"
rc=$?
t1=$(date +%s.%N)
echo "rc $rc wall $(python3 -c "print(round($t1 - $t0, 1))")"
exit $rc
