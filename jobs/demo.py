"""`make demo`: the tiny preset end to end on this machine.

For now: builds the tiny BLIP-2 (frozen ViT + Q-Former + frozen OPT), runs one stage-1 step (ITC, ITM,
ITG) and one stage-2 step on generated shape images, exports both stages in HF format, reloads the
stage-2 export and captions a generated image.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from blip2_ray.errors import cli_main  # noqa: E402
from blip2_ray.model import hf_io  # noqa: E402
from blip2_ray.model.config import model_config  # noqa: E402
from blip2_ray.model.stage2 import generate_text  # noqa: E402


def shape_image(colour: str, size: int) -> Image.Image:
    rgb = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (230, 210, 30)}[colour]
    img = Image.new("RGB", (size, size), (245, 245, 245))
    ImageDraw.Draw(img).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=rgb)
    return img


def to_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    mean = np.array(hf_io.CLIP_MEAN, dtype=np.float32)
    std = np.array(hf_io.CLIP_STD, dtype=np.float32)
    arr = [((np.asarray(im.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255 - mean) / std).transpose(2, 0, 1)
           for im in images]
    return torch.from_numpy(np.stack(arr))


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="demo_out", help="where the exports go")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = model_config("tiny")
    size = cfg.vision.image_size
    colours = ["red", "blue", "green", "yellow"]
    pixels = to_pixels([shape_image(c, 64) for c in colours], size)

    qtok = hf_io.qformer_tokenizer(cfg)
    stage1 = hf_io.build_stage1(cfg, qtok)
    enc = qtok([f"a {c} circle" for c in colours], padding="longest", return_tensors="pt")
    out1 = stage1(pixels, enc.input_ids, enc.attention_mask)
    print("stage 1 losses: " + ", ".join(f"{k}={v:.4f}" for k, v in out1.components().items()))
    s1_dir = hf_io.export_stage1(stage1, str(Path(args.out) / "stage1"), qtok, cfg)

    ltok = hf_io.llm_tokenizer(cfg)
    stage2 = hf_io.build_stage2(model_config("tiny", init_from=s1_dir), ltok)
    enc2 = ltok([f"a {c} circle\n" for c in colours], padding="longest", return_tensors="pt")
    out2 = stage2(pixels, enc2.input_ids, enc2.attention_mask)
    print("stage 2 losses: " + ", ".join(f"{k}={v:.4f}" for k, v in out2.components().items()))
    s2_dir = hf_io.export_stage2(stage2, str(Path(args.out) / "stage2"), ltok, cfg)

    reloaded = hf_io.load_stage2(s2_dir, vision_dtype=torch.float32, llm_dtype=torch.float32).eval()
    caption = generate_text(reloaded, ltok, pixels[:1], None, num_beams=3, max_new_tokens=8)[0]
    print(f"caption of a generated red circle (untrained tiny model): {caption!r}")
    print(f"exports: {s1_dir} (Blip2ForImageTextRetrieval), {s2_dir} (Blip2ForConditionalGeneration)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
