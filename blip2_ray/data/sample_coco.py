"""Generated data in the layout of the COCO Karpathy files users download for fine-tuning.

    <out>/images/train2014/COCO_train2014_<id:012d>.jpg, <out>/images/val2014/COCO_val2014_<id:012d>.jpg
    <out>/annotations/coco_karpathy_train.json  [{"image": "train2014/...jpg", "caption": str, "image_id": str}]
                                                (one entry per caption, as LAVIS ships it)
    <out>/annotations/coco_karpathy_test.json   [{"image": "val2014/...jpg", "caption": [str, ...]}]
The images are data/sample.py's coloured shapes; every caption describes its image.
"""

from __future__ import annotations

import json
import os

import numpy as np

from blip2_ray.data.sample import TEMPLATES, _jpeg, draw_shape
from blip2_ray.model.tokenizers import COLOURS, SHAPES


def make_coco_karpathy_sample(out_dir: str, num_train: int = 64, num_test: int = 16, image_size: int = 32,
                              captions_per_image: int = 2, seed: int = 0, num_colours: int = 6,
                              num_shapes: int = 4) -> dict:
    """Write the layout above; returns {"image_root", "train", "test"} (absolute paths)."""
    rng = np.random.default_rng(seed)
    colours, shapes = COLOURS[:num_colours], SHAPES[:num_shapes]
    root = os.path.join(out_dir, "images")
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    train, test = [], []
    for split, count, folder in (("train", num_train, "train2014"), ("test", num_test, "val2014")):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for i in range(count):
            image_id = (1 if split == "train" else 500_000) + i
            c, s = colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]
            rel = f"{folder}/COCO_{folder}_{image_id:012d}.jpg"
            with open(os.path.join(root, rel), "wb") as f:
                f.write(_jpeg(draw_shape(c, s, image_size, rng)))
            caps = [TEMPLATES[int(j)].format(c=c, s=s) for j in rng.permutation(len(TEMPLATES))[:captions_per_image]]
            if split == "train":
                train += [{"image": rel, "caption": cap, "image_id": str(image_id)} for cap in caps]
            else:
                test.append({"image": rel, "caption": caps, "image_id": image_id})
    paths = {"image_root": os.path.abspath(root)}
    for name, entries in (("train", train), ("test", test)):
        paths[name] = os.path.abspath(os.path.join(ann_dir, f"coco_karpathy_{name}.json"))
        with open(paths[name], "w") as f:
            json.dump(entries, f)
    return paths
