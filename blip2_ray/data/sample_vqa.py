"""Generated data in the layout of VQAv2's official files, for VQA fine-tuning tests and the tiny config.

    <out>/images/train2014/COCO_train2014_<id:012d>.jpg, <out>/images/val2014/COCO_val2014_<id:012d>.jpg
    <out>/annotations/v2_OpenEnded_mscoco_<split>_questions.json  {"data_subtype": "<split>", "questions":
                                                                   [{"image_id", "question", "question_id"}]}
    <out>/annotations/v2_mscoco_<split>_annotations.json          {"data_subtype": "<split>", "annotations":
        [{"question_id", "image_id", "question_type", "answer_type", "multiple_choice_answer",
          "answers": [{"answer", "answer_confidence", "answer_id"} x 10]}]}
Each image (data/sample.py's coloured shapes) gets two questions: its colour and its shape; the ten human
answers are the right one, except that `noise` of them (per question) name another colour or shape.
"""

from __future__ import annotations

import json
import os

import numpy as np

from blip2_ray.data.sample import _jpeg, draw_shape
from blip2_ray.model.tokenizers import COLOURS, SHAPES

QUESTIONS = (("what colour is the shape?", "colour"), ("what shape is it?", "shape"))


def make_vqav2_sample(out_dir: str, num_train: int = 48, num_test: int = 16, image_size: int = 32, seed: int = 0,
                      num_colours: int = 4, num_shapes: int = 3, noise: int = 1) -> dict:
    """Write the layout above; returns {"train", "train_questions", "train_image_root", "test", "test_questions",
    "test_image_root"} (absolute paths; an image root is the folder of its split's images, as VQAv2 names them
    by file name only)."""
    rng = np.random.default_rng(seed)
    colours, shapes = COLOURS[:num_colours], SHAPES[:num_shapes]
    root, ann_dir = os.path.join(out_dir, "images"), os.path.join(out_dir, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    paths = {}
    for name, split, count, first_id in (("train", "train2014", num_train, 1), ("test", "val2014", num_test, 500_000)):
        folder = os.path.join(root, split)
        os.makedirs(folder, exist_ok=True)
        paths[f"{name}_image_root"] = os.path.abspath(folder)
        questions, annotations = [], []
        for i in range(count):
            image_id = first_id + i
            c, s = colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]
            with open(os.path.join(folder, f"COCO_{split}_{image_id:012d}.jpg"), "wb") as f:
                f.write(_jpeg(draw_shape(c, s, image_size, rng)))
            for j, (question, kind) in enumerate(QUESTIONS):
                qid = image_id * 10 + j
                right, pool = (c, colours) if kind == "colour" else (s, shapes)
                answers = [right] * (10 - noise) + [str(rng.choice([w for w in pool if w != right]))] * noise
                questions.append({"image_id": image_id, "question": question, "question_id": qid})
                annotations.append({
                    "question_id": qid, "image_id": image_id, "question_type": f"what {kind}",
                    "answer_type": "other", "multiple_choice_answer": right,
                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                                for k, a in enumerate(answers)]})
        common = {"info": {"description": "generated VQAv2-layout sample"}, "license": {}, "data_subtype": split}
        paths[f"{name}_questions"] = _write(os.path.join(ann_dir, f"v2_OpenEnded_mscoco_{split}_questions.json"),
                                            {**common, "task_type": "Open-Ended", "data_type": "mscoco",
                                             "questions": questions})
        paths[name] = _write(os.path.join(ann_dir, f"v2_mscoco_{split}_annotations.json"),
                             {**common, "data_type": "mscoco", "annotations": annotations})
    return paths


def _write(path: str, data: dict) -> str:
    with open(path, "w") as f:
        json.dump(data, f)
    return os.path.abspath(path)
