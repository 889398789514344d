"""The config of `blip2-ray evaluate`: task, model, test set, generation settings, Ray resources."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blip2_ray.config_fields import doc
from blip2_ray.data.config import DataConfig
from blip2_ray.runtime.compute import ComputeConfig


@dataclass
class TestSetConfig:
    annotations: str | None = doc(
        "test-set JSON: retrieval/caption: a LAVIS Karpathy file [{image, caption: [..]}] or Karpathy's "
        "dataset_*.json {images: [{filepath, filename, split, sentences}]}; vqa: [{question_id, question, "
        "image, answer: [..] | str}] or VQAv2 annotations (with `questions`)", None)
    questions: str | None = doc("VQAv2 questions JSON ({questions: [...]}) beside VQAv2 `annotations`", None)
    image_root: str = doc("folder the annotation's image paths are relative to", "")
    image_pattern: str = doc("VQAv2 files: image file name from image_id", "COCO_val2014_{image_id:012d}.jpg")
    split: str = doc("split to take from Karpathy's dataset_*.json files", "test")
    shards: list[str] = doc("instead of annotations: image-text shards (each record: image + caption(s))",
                            factory=list)
    references: str | None = doc("caption task: COCO caption annotations to score against (default: the "
                                 "test set's own captions)", None)
    limit: int | None = doc("evaluate only the first N images / questions (smoke runs)", None)


@dataclass
class RetrievalConfig:
    k_test: int = doc("candidates per query re-ranked by ITM (the reference uses 128)", 128, ge=1)
    itm_batch_size: int = doc("image-text pairs per ITM forward", 128, ge=1)
    match_identical_texts: bool = doc(
        "count a retrieved text as right when it equals one of the image's captions (generated data "
        "repeats captions; the training demo's R@1 counts hits this way)", False)


@dataclass
class GenerationConfig:
    num_beams: int = doc("beam width", 5, ge=1)
    max_new_tokens: int = doc("longest output, tokens", 30, ge=1)
    min_new_tokens: int = doc("shortest output, tokens", 8, ge=0)
    prompt: str = doc("caption: text prompt; vqa: a template with {} for the question ('' = the model's "
                      "recipe prompt: OPT 'Question: {} Answer:', FlanT5 'Question: {} Short answer:')", "a photo of")
    length_penalty: float = doc("beam length penalty (VQA in the reference: -1)", 1.0)


@dataclass
class EvalComputeConfig(ComputeConfig):
    """The shared actor-pool section plus the one dtype of the evaluated model's ViT and LLM."""

    dtype: str = doc("ViT/LLM dtype: float32 | float16 | bfloat16 | auto (fp16 on GPU, fp32 on CPU)", "auto")


@dataclass
class EvalConfig:
    task: Literal["retrieval", "caption", "vqa"] = doc("what to evaluate", "retrieval")
    model: str = doc("export directory: stage 1 for retrieval, stage 2 for caption / vqa", "")
    vqa_format: Literal["vqav2", "okvqa", "gqa"] = doc("vqa: answer format and metric (gqa: exact match)", "vqav2")
    vqa_rules: Literal["lavis", "official"] = doc(
        "vqa: answer scoring rules: lavis = LAVIS's copy of the VQA evaluator (the paper's val numbers), official "
        "= GT-Vision-Lab/VQA's vqaEval.py (also normalises disagreeing human answers; leaves the prediction raw "
        "when all ten agree); gqa: lavis only (docs/evaluation.md)", "lavis")
    meteor: bool | None = doc("caption: METEOR through pycocoevalcap's Java jar (one JVM per scoring): null scores it "
                              "where java and the jar are present, true requires them, false skips it", None)
    output: str = doc("the JSON report (predictions and rankings go beside it)", "eval_report.json")
    test_set: TestSetConfig = doc("the images and their captions / questions", factory=TestSetConfig)
    retrieval: RetrievalConfig = doc("retrieval settings", factory=RetrievalConfig)
    generation: GenerationConfig = doc("caption / vqa generation (the recipe's values by default)",
                                       factory=GenerationConfig)
    compute: EvalComputeConfig = doc("Ray actor pool", factory=EvalComputeConfig)
    data: DataConfig = doc("record decoding and checks for shards (image_keys, caption_keys, ...)",
                           factory=DataConfig)

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model must name an export directory")
        if not self.test_set.annotations and not self.test_set.shards:
            raise ValueError("test_set.annotations or test_set.shards must be set")
        if self.task == "vqa" and not self.test_set.annotations:
            raise ValueError("vqa needs test_set.annotations")
        if self.vqa_format == "gqa" and self.vqa_rules != "lavis":
            raise ValueError("vqa_rules must be lavis for vqa_format gqa (the official VQA evaluator has no GQA "
                             "exact match)")
