"""Host memory of building and loading real-width models (`make bench-model-memory`).

(a) `build_stage2` of the vitg_opt2.7b preset in bf16 with `allow_random_init` (frozen ViT and OPT
allocated directly in bf16); (b) `load_stage2` of that model's export; the same for stage 1
(`build_stage1`, `load_stage1`: the ViT-g in bf16, the Q-Former in float32). Each runs in a fresh process;
reported: peak RSS growth during the step, every weight read once afterwards (memory-mapped weights
count once resident), / bytes the model stores (parameters + buffers), target
<= 1.3. Baseline: the stored bytes themselves (ratio 1.0 = no second copy at any point).

Usage: python bench/bench_model_memory.py [--layers N]   (N: ViT and OPT blocks; default 4, the full
model is --layers 0: 39 ViT + 32 OPT blocks, ~8 GB of bf16 weights, needs ~10 GB free memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def model_cfg(layers: int):
    from blip2_ray.model.config import model_config

    vision, llm = {"dtype": "bfloat16"}, {"dtype": "bfloat16"}
    if layers:
        vision["num_layers"], llm["num_layers"] = layers, layers
    return model_config("vitg_opt2.7b", vision=vision, llm=llm, allow_random_init=True)


def child(step: str, layers: int, export_dir: str) -> dict:
    import torch

    from blip2_ray.weights.builders import build_stage1, build_stage2
    from blip2_ray.weights.checkpoint_files import stored_bytes
    from blip2_ray.weights.hf_format import export_stage1, export_stage2, load_stage1, load_stage2
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer

    cfg = model_cfg(layers)
    tok = qformer_tokenizer(cfg) if step.endswith("1") else llm_tokenizer(cfg)
    import transformers  # noqa: F401  (imports counted in the baseline, not in the step)

    before, t0 = rss_bytes(), time.perf_counter()
    torch.manual_seed(0)
    if step == "build2":
        model = build_stage2(cfg, tok)
    elif step == "load2":
        model = load_stage2(export_dir, vision_dtype=torch.bfloat16, llm_dtype=torch.bfloat16)
    elif step == "build1":
        model = build_stage1(cfg, tok)
    else:
        model, _ = load_stage1(export_dir + "1", vision_dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # read every weight once: memory-mapped ones count once they are resident
        for p in model.parameters():
            p.sum()
    out = {"step": step, "stored": stored_bytes(model), "growth": peak_rss_bytes() - before, "seconds": seconds,
           "dtypes": sorted({str(p.dtype) for p in model.parameters()})}
    if step == "build2":
        export_stage2(model, export_dir, tok, cfg)
    elif step == "build1":
        export_stage1(model, export_dir + "1", tok, cfg)
    out["growth_with_export"] = peak_rss_bytes() - before
    return out


STEPS = {"build2": "build_stage2 (allow_random_init)", "load2": "load_stage2 of its export",
         "build1": "build_stage1 (allow_random_init)", "load1": "load_stage1 of its export"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="ViT and OPT blocks (0: the full 39 + 32)")
    ap.add_argument("--child", choices=list(STEPS), help=argparse.SUPPRESS)
    ap.add_argument("--export-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.export_dir)))
        return
    size = "full size (39 ViT + 32 OPT blocks)" if not args.layers else f"{args.layers} ViT + {args.layers} OPT blocks"
    print(f"vitg_opt2.7b in bf16, real widths, {size}; one fresh process per step")
    with tempfile.TemporaryDirectory(prefix="bench_model_memory_") as d:
        for step, name in STEPS.items():
            cmd = [sys.executable, __file__, "--child", step, "--layers", str(args.layers), "--export-dir", d + "/m"]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(line)
            print(f"  {name:34s} stored {r['stored'] / 2**30:6.2f} GiB  peak RSS growth {r['growth'] / 2**30:6.2f} GiB"
                  f"  ratio {r['growth'] / r['stored']:.2f} (target <= 1.3)  {r['seconds']:.1f} s  {r['dtypes']}"
                  + (f"  (then export: {r['growth_with_export'] / r['stored']:.2f})" if "build" in step else ""))


if __name__ == "__main__":
    main()
