"""What kind of model a directory's config.json describes, and that config.json read with one clear error, without
torch (the Serve app decides what it can serve from this before anything heavy is imported)."""

from __future__ import annotations

import json
import os

from blip2_ray.errors import UserError

BLIP2_MODEL_TYPES = ("blip-2", "blip_2")  # transformers writes "blip-2" into config.json
INSTRUCTBLIP_MODEL_TYPE = "instructblip"  # a VQA fine-tune's export (its Q-Former reads the question)
NATIVE_MODEL_TYPE = "blip2_ray"  # our own export format where no HF class holds the model (native_format.py)
# what each HF class an export mirrors holds (export_kind)
_KINDS_BY_CLASS = {"Blip2ForImageTextRetrieval": "stage1", "Blip2ForConditionalGeneration": "stage2",
                   "InstructBlipForConditionalGeneration": "vqa"}


def is_native_config(data: dict) -> bool:
    """Whether a config.json is of our own export format (a CLIP ViT-L model; weights/native_format.py)."""
    return data.get("model_type") == NATIVE_MODEL_TYPE


def export_kind(data: dict) -> str | None:
    """What a model directory's config.json describes, in HF's format or ours: "stage1" (the retrieval model:
    Blip2ForImageTextRetrieval layout), "stage2" (Blip2ForConditionalGeneration), "vqa" (a VQA fine-tune whose
    Q-Former reads the question: InstructBlipForConditionalGeneration), None for anything else."""
    model_type, arch = data.get("model_type"), list(data.get("architectures") or [])
    if model_type == INSTRUCTBLIP_MODEL_TYPE:
        return "vqa"
    if model_type == NATIVE_MODEL_TYPE:
        return next((_KINDS_BY_CLASS[a] for a in arch if a in _KINDS_BY_CLASS), None)
    if model_type in BLIP2_MODEL_TYPES:
        return "stage1" if "Blip2ForImageTextRetrieval" in arch else "stage2"
    return None


def read_dir_config(path: str, what: str, not_dir: str, no_config: str) -> dict:
    """config.json of the local model directory `path`, as a dict; one UserError naming `what` when `path` is not
    a local directory (then `not_dir` says what to do), holds no config.json or no JSON object (`no_config`),
    or its config.json is not readable JSON."""
    if not os.path.isdir(path):
        raise UserError(f"{what} {path!r} is not a local directory; {not_dir}")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise UserError(f"{what} {path!r} holds no model (no config.json); {no_config}")
    try:
        with open(config) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{what} {path!r}: config.json is not readable JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path!r}: config.json holds no JSON object; {no_config}")
    return data
