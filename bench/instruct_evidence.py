"""The evidence of instruction tuning at tiny size (docs/finetuning.md, "Instruction tuning"), over seeds:

    make bench-instruct-evidence                       # seeds 0 1 2
    python bench/instruct_evidence.py --seeds 0 1 2 [--lora-r 4] [--json]

Per seed: generated data (five held-in tasks, yes / no held out entirely), the tiny start
(fixtures/tiny_instruct.py: pre-trained ViT and OPT, random Q-Former), then the real job (`blip2-ray finetune
--config jobs/configs/finetune_instruct_tiny.yaml`, a local Ray instance of its own) and its report's zero-shot /
fine-tuned scores. Prints a line per seed and, last, one JSON object with each seed's figures and the smallest
held-in and held-out gains (the learning test, tests/integration/test_finetune_instruct.py, asserts half of them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from blip2_ray.fixtures.tiny_instruct import (
    instruct_data_and_start,
    instruct_gains,
    instruct_job_sets,
    run_instruct_job,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lora-r", type=int, default=4, help="LoRA rank on the LLM (0: LLM frozen, Q-Former only)")
    p.add_argument("--json", action="store_true", help="only the last JSON line")
    args = p.parse_args(argv)
    rows = {}
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix=f"instruct_evidence_{seed}_") as root:
            t0 = time.perf_counter()
            d = instruct_data_and_start(root, seed)
            t_start = time.perf_counter() - t0
            out = os.path.join(root, "out")
            env = {"RAY_ADDRESS": ""}  # a local Ray instance of the job's own
            proc = run_instruct_job(instruct_job_sets(d, out, os.path.join(root, "runs"), seed, args.lora_r), env)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
                raise SystemExit(f"seed {seed}: the job failed (exit {proc.returncode})")
            row = instruct_gains(json.loads(Path(out, "finetune_report.json").read_text()))
            row.update(start_s=round(t_start, 1), job_s=round(time.perf_counter() - t0 - t_start, 1))
            rows[seed] = row
            if not args.json:
                print(f"seed {seed}: held_in {row['held_in'][0]:.2f} -> {row['held_in'][1]:.2f}, held_out "
                      f"{row['held_out'][0]:.2f} -> {row['held_out'][1]:.2f}; per source {row['per_source']}; "
                      f"start {t_start:.0f}s, job {row['job_s']:.0f}s", flush=True)
    summary = {"lora_r": args.lora_r, "seeds": rows,
               "min_held_in_gain": min(r["held_in"][1] - r["held_in"][0] for r in rows.values()),
               "min_held_out_gain": min(r["held_out"][1] - r["held_out"][0] for r in rows.values())}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
