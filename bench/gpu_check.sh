#!/usr/bin/env bash
# GPU figures against same-process baselines (bench/gpu_check.py), one JSON object last; <= 8 minutes on one GPU.
#   On the lent GPU machine (../shared/gpu/README.md; carry .whl):  bash bench/gpu_check.sh
#   CPU rehearsal at tiny size:                                      GPU_CHECK_TINY=1 bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ! python3 -c "import ray, deepspeed" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT_JSON=${OUT:-/tmp}/gpu_check.json
if [ "${GPU_CHECK_TINY:-0}" = 1 ]; then
  exec timeout 300 "$PY" bench/gpu_check.py --tiny --device cpu --out "$OUT_JSON"
fi
exec timeout 480 "$PY" bench/gpu_check.py --device cuda --out "$OUT_JSON"
