"""Generated instruction-tuning data for the tiny instruct run and its tests: images of one to three shapes of
one colour (data/sample.py's shapes in the cells of a 2 x 2 grid), and one annotation file per task in the
layouts the instruct readers take (data/instruct.py):

    <out>/images/{train,test}/<id>.jpg
    <out>/annotations/colour_{train,test}.json    LAVIS VQA list [{question_id, question, image, answer: [..]}]
    <out>/annotations/shape_{train,test}.json     "
    <out>/annotations/count_{train,test}.json     "   (one, two, three)
    <out>/annotations/yesno_{train,test}.json     "   (is it <colour>? / is it a <shape>?: yes or no, half each)
    <out>/annotations/describe_{train,test}.json  LAVIS caption list [{image, caption}] ("two red circles")
    <out>/annotations/chat_train.json             LLaVA-Instruct [{id, image, conversations: [human, gpt, ...]}]
Every answer is true of its image. `TASK_TEMPLATES` are short templates of each task (the paper's are long
sentences that the tiny tokenizers spell letter by letter).
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from blip2_ray.data.sample import _jpeg, draw_shape
from blip2_ray.model.tokenizers import COLOURS, SHAPES

NUMBERS = ["one", "two", "three"]
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
TASK_TEMPLATES = {
    "vqa": ["Question: {} Answer:", "Question: {} Short answer:", "Q: {} A:"],
    "caption": ["A short image caption:", "A photo of", "Describe the image."],
    "conversation": ["{}"],
}
COLOUR_QUESTIONS = ["what colour is it?", "what color is the shape?"]
SHAPE_QUESTIONS = ["what shape is it?", "which shape is this?"]
COUNT_QUESTIONS = ["how many shapes are there?", "how many objects?"]


def draw_shapes(colour: str, shape: str, count: int, size: int, rng: np.random.Generator) -> Image.Image:
    """`count` copies of one shape in one colour, each in its own cell of a 2 x 2 grid, on a light background."""
    bg = tuple(int(v) for v in rng.integers(225, 256, size=3))
    im = Image.new("RGB", (size, size), bg)
    cell = size // 2
    for k in rng.permutation(4)[:count]:
        im.paste(draw_shape(colour, shape, cell, rng), (int(k % 2) * cell, int(k // 2) * cell))
    return im


def describe(colour: str, shape: str, count: int) -> str:
    return f"a {colour} {shape}" if count == 1 else f"{NUMBERS[count - 1]} {colour} {PLURAL.get(shape, shape + 's')}"


def make_instruct_sample(out_dir: str, num_train: int = 96, num_test: int = 24, image_size: int = 32, seed: int = 0,
                         num_colours: int = 4, num_shapes: int = 3) -> dict:
    """Write the layout above; returns {"image_root": {"train", "test"}, "<task>_<split>": path, "attributes":
    {image path: [colour, shape, count word]}} (absolute paths)."""
    rng = np.random.default_rng(seed)
    colours, shapes = COLOURS[:num_colours], SHAPES[:num_shapes]
    ann_dir = os.path.join(out_dir, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    out: dict = {"image_root": {}, "attributes": {}}
    for split, count in (("train", num_train), ("test", num_test)):
        folder = os.path.join(out_dir, "images", split)
        os.makedirs(folder, exist_ok=True)
        out["image_root"][split] = os.path.abspath(folder)
        files: dict[str, list] = {k: [] for k in ("colour", "shape", "count", "yesno", "describe", "chat")}
        for i in range(count):
            image_id = (1 if split == "train" else 100_000) + i
            c, s = colours[int(rng.integers(len(colours)))], shapes[int(rng.integers(len(shapes)))]
            n = int(rng.integers(1, 4))
            name = f"{image_id}.jpg"
            with open(os.path.join(folder, name), "wb") as f:
                f.write(_jpeg(draw_shapes(c, s, n, image_size, rng)))
            out["attributes"][os.path.join(out["image_root"][split], name)] = [c, s, NUMBERS[n - 1]]

            if rng.random() < 0.5:  # yes / no about the colour, true half the time
                asked = c if rng.random() < 0.5 else str(rng.choice([x for x in colours if x != c]))
                yesno = (f"is it {asked}?", "yes" if asked == c else "no")
            else:
                asked = s if rng.random() < 0.5 else str(rng.choice([x for x in shapes if x != s]))
                yesno = (f"is it a {asked}?", "yes" if asked == s else "no")
            for k, (task, question, answer) in enumerate((
                    ("colour", COLOUR_QUESTIONS[int(rng.integers(2))], c),
                    ("shape", SHAPE_QUESTIONS[int(rng.integers(2))], s),
                    ("count", COUNT_QUESTIONS[int(rng.integers(2))], NUMBERS[n - 1]), ("yesno", *yesno))):
                files[task].append({"question_id": image_id * 10 + k, "question": question, "image": name,
                                    "answer": [answer] * 3, "image_id": image_id})
            caption = describe(c, s, n)
            files["describe"].append({"image": name, "caption": caption if split == "train" else [caption],
                                      "image_id": image_id})
            files["chat"].append({"id": str(image_id), "image": name, "conversations": [
                {"from": "human", "value": "<image>\nwhat is in the picture?"}, {"from": "gpt", "value": caption},
                {"from": "human", "value": SHAPE_QUESTIONS[0]}, {"from": "gpt", "value": f"it is a {s}"}]})
        for task, entries in files.items():
            if task == "chat" and split == "test":
                continue
            path = os.path.abspath(os.path.join(ann_dir, f"{task}_{split}.json"))
            with open(path, "w") as f:
                json.dump(entries, f)
            out[f"{task}_{split}"] = path
    return out
