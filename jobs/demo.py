"""`make demo`: data -> stage 1 -> stage 2 -> held-out R@1 and captions, on a local Ray instance (CPU).

1. Generates WebDataset shards of coloured shapes ("a photo of a red circle"), training and held out.
2. Pre-trains the tiny *frozen* backbones BLIP-2 needs (plain PyTorch, seconds; real users load real
   checkpoints instead): a ViT that tells colours and shapes apart, and an OPT that writes captions and,
   like any pre-trained LLM, can pick facts up from its context.
3. Stage 1 with `run_pretrain` (the code behind jobs/pretrain.py): Ray Data -> 2 Ray Train workers ->
   DeepSpeed ZeRO-2, exported in the `Blip2ForImageTextRetrieval` layout.
4. Stage 2 from that export with the frozen OPT, exported as `Blip2ForConditionalGeneration`.
5. Held-out image->text R@1 (vs chance) and captions that should name the right colour and shape.
6. Leaves what the README's next commands read: the exports (demo_out/stage1, demo_out/stage2), the held-out
   shards, and a copy of them whose captions are deliberately wrong (demo_out/data/web_wrong, CapFilt's input).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from blip2_ray.runtime.cli import cli_main
from blip2_ray.runtime.cluster import PROGRESS_CHOICES, init_ray


def rows_of(shards: str, image_size: int, qformer_tok: str | None, llm_tok: str | None) -> list[dict]:
    """Eval-transformed rows of `shards` through the real data pipeline."""
    from blip2_ray.config import from_dict
    from blip2_ray.data.config import DataConfig
    from blip2_ray.data.pipeline import build_dataset

    cfg = from_dict(DataConfig, {"image_size": image_size})
    return build_dataset(cfg, [shards], train=False, qformer_tokenizer=qformer_tok, llm_tokenizer=llm_tok).take_all()


def colour_shape(caption: str) -> tuple[str, str]:
    from blip2_ray.weights.tiny_tokenizers import COLOURS, SHAPES

    words = caption.split()
    return next(w for w in words if w in COLOURS), next(w for w in words if w in SHAPES)


def stack(rows: list[dict], key: str) -> torch.Tensor:
    """A column of pipeline rows as one tensor (pixel_values arrive uint8 and leave CLIP-normalised)."""
    import numpy as np

    from blip2_ray.data.transforms import normalize_pixels

    col = np.stack([np.asarray(r[key]) for r in rows])
    return torch.from_numpy(normalize_pixels(col) if key == "pixel_values" else col)


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="demo_out", help="working directory (data, runs, exports)")
    ap.add_argument("--stage1-steps", type=int, default=600)
    ap.add_argument("--stage2-steps", type=int, default=800)
    ap.add_argument("--num-train", type=int, default=2048)
    ap.add_argument("--address", default=None, help="Ray address (default: start a local instance)")
    ap.add_argument("--progress", choices=PROGRESS_CHOICES, default="auto",
                    help="Ray Data progress bars: auto (only when the output is a terminal), on, off")
    args = ap.parse_args(argv)

    from blip2_ray.config import load_config
    from blip2_ray.fixtures.backbones import pretrain_tiny_llm, pretrain_tiny_vision
    from blip2_ray.fixtures.sample import make_sample_shards
    from blip2_ray.model.config import model_config
    from blip2_ray.model.prompts import generate_text
    from blip2_ray.train.config import PretrainConfig
    from blip2_ray.train.evaluate import caption_names_object, retrieval_recall_at_1
    from blip2_ray.train.trainer import run_pretrain
    from blip2_ray.weights.hf_format import load_stage1, load_stage2
    from blip2_ray.weights.tiny_tokenizers import COLOURS, SHAPES
    from blip2_ray.weights.tokenizer_paths import llm_tokenizer, resolve_tokenizer_dir

    t0 = time.time()
    stamp = lambda: f"[{time.time() - t0:.0f}s]"  # noqa: E731
    work = os.path.abspath(args.out)
    size = 32
    train = make_sample_shards(f"{work}/data/train", num=args.num_train, shards=8, image_size=size, seed=0)
    make_sample_shards(f"{work}/data/heldout", num=96, shards=1, image_size=size, seed=12345)
    print(f"1. data: {train['good']} training and 96 held-out images of coloured shapes {stamp()}", flush=True)

    if args.address:
        init_ray(args.address, progress=args.progress)
    else:  # the demo's own instance, even inside a shell that names another cluster in RAY_ADDRESS
        os.environ.pop("RAY_ADDRESS", None)
        # 4 logical CPUs on any machine: the 2 train workers and a decode task must fit at once, or Ray waits
        # for resources forever
        init_ray("local", env_vars={"DS_ACCELERATOR": "cpu"}, num_cpus=4, include_dashboard=False, log_to_driver=True,
                 progress=args.progress)

    # 2. the frozen backbones, pre-trained on the same kind of data and then frozen for BLIP-2
    cfg = model_config("tiny")
    rows = rows_of(f"{work}/data/train", size, None, None)
    labels = [colour_shape(r["caption"]) for r in rows]
    colour_id = torch.tensor([COLOURS.index(c) for c, _ in labels])
    shape_id = torch.tensor([SHAPES.index(s) for _, s in labels])
    vit_dir = pretrain_tiny_vision(cfg, stack(rows, "pixel_values"), [colour_id, shape_id], f"{work}/tiny_vit",
                                   steps=600)
    llm_dir = pretrain_tiny_llm(cfg, llm_tokenizer(cfg), [str(r["caption"]) for r in rows], f"{work}/tiny_opt",
                                attribute_words=COLOURS + SHAPES, steps=1500)
    print(f"2. tiny frozen backbones pre-trained: ViT {vit_dir}, OPT {llm_dir} {stamp()}", flush=True)

    common = [f"data.train=[{work}/data/train]", f"data.image_size={size}", "data.min_crop_scale=0.8",
              # one decode task at a time: it keeps up with the 2 tiny-model workers, and more tasks only
              # compete with them for the 2 cores (4 tasks: stage 1 took 342 s with 22-76% data wait;
              # 1 task: 220 s, 20% wait). R@1 varies from run to run either way (0.23-0.73 seen)
              "data.shuffle_buffer=256", "data.num_cpus_per_decode_task=0.5", "data.decode_concurrency=1",
              "data.decode_batch_size=64",
              "train.global_batch_size=64", "train.micro_batch_size=32", "train.precision=fp32",
              "train.lr=3e-3", "train.warmup_steps=20", "train.log_every=25", "train.checkpoint_every=1000",
              "scaling.num_workers=2", f"storage_path={work}/runs", "model.qformer.dropout=0.0",
              f"model.vision.path={vit_dir}"]
    s1 = load_config(PretrainConfig, None, common + [
        "stage=1", f"run_name=demo_stage1_{int(t0)}", f"output_dir={work}/stage1",
        f"train.max_steps={args.stage1_steps}"])
    run_pretrain(s1)

    held = rows_of(f"{work}/data/heldout", size, resolve_tokenizer_dir("tiny", "qformer"), None)
    truth = [colour_shape(r["caption"]) for r in held]
    stage1, _ = load_stage1(s1.output_dir, vision_dtype="float32")
    r1, chance = retrieval_recall_at_1(stage1, stack(held, "pixel_values"), stack(held, "qformer_input_ids"),
                                       stack(held, "qformer_attention_mask"), truth)
    # the same R@1 counted as jobs/evaluate.py does (a hit retrieves the identical caption text)
    r1_text, chance_text = retrieval_recall_at_1(
        stage1, stack(held, "pixel_values"), stack(held, "qformer_input_ids"), stack(held, "qformer_attention_mask"),
        [str(r["caption"]) for r in held])
    print(f"3. stage 1: held-out image->text R@1 {r1:.2f} for the right colour and shape (chance {chance:.2f}); "
          f"{r1_text:.2f} for the identical caption text (chance {chance_text:.2f}) {stamp()}", flush=True)

    s2 = load_config(PretrainConfig, None, common + [
        "stage=2", f"run_name=demo_stage2_{int(t0)}", f"output_dir={work}/stage2",
        f"train.max_steps={args.stage2_steps}", f"model.init_from={s1.output_dir}", f"model.llm.path={llm_dir}"])
    run_pretrain(s2)

    model = load_stage2(s2.output_dir, vision_dtype=torch.float32, llm_dtype=torch.float32).eval()
    tok = llm_tokenizer(s2.model)
    captions = generate_text(model, tok, stack(held, "pixel_values"), None, num_beams=1, max_new_tokens=10)
    right = sum(caption_names_object(g, c, s) for g, (c, s) in zip(captions, truth))
    print(f"4. stage 2 captions of held-out images {stamp()}:")
    for g, (c, s) in list(zip(captions, truth))[:6]:
        print(f"     shows a {c} {s:9s} -> {g!r}")
    print(f"   {right}/{len(held)} held-out captions name the right colour and shape "
          f"(chance {1 / (6 * 4):.2f})", flush=True)
    from blip2_ray.fixtures.capfilt_measure import swap_web_captions

    swap_web_captions(f"{work}/data/heldout", f"{work}/data/web_wrong")  # CapFilt's input (capfilt_tiny.yaml)
    summary = {"r1_image_to_text": round(r1, 4), "r1_chance": round(chance, 4),
               "r1_identical_caption": round(r1_text, 4), "r1_identical_caption_chance": round(chance_text, 4),
               "caption_accuracy": round(right / len(held), 4), "seconds": round(time.time() - t0, 1),
               "stage1_export": s1.output_dir, "stage2_export": s2.output_dir}
    Path(work, "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
