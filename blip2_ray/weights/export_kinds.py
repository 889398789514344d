"""What kind of model a directory's config.json describes, without torch (the Serve app decides what it can serve
from this before anything heavy is imported)."""

from __future__ import annotations

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
