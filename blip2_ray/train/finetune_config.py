"""The `blip2-ray finetune` config: the pre-training tree (model, data, train, scaling, deepspeed...) plus
the task, its annotation files, how the ViT trains and the evaluation at the end.

`FinetuneConfig` is a `PretrainConfig`, so the Ray Train + DeepSpeed loop runs it unchanged; the task
decides the stage (caption / vqa: the stage-2 model with the LLM; retrieval: the stage-1 model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from blip2_ray.config_fields import doc
from blip2_ray.eval.config import EvalComputeConfig, GenerationConfig, RetrievalConfig
from blip2_ray.train.config import PretrainConfig, TrainConfig
from blip2_ray.train.instruct_config import InstructSection, LlmLoraSection

TASK_STAGE = {"caption": 2, "vqa": 2, "retrieval": 1, "instruct": 2}


@dataclass
class AnnotationSection:
    train: str = doc("training annotations: caption / retrieval: a LAVIS/BLIP COCO Karpathy (or Flickr30k) JSON "
                     "list [{image, caption, image_id}] or Karpathy's dataset_*.json", "")
    eval: str | None = doc("held-out annotations (same formats; captions may be lists) evaluated at the end of "
                           "training; None: no evaluation", None)
    questions: str | None = doc("vqa: VQAv2's official questions file beside `train` when `train` is VQAv2's "
                                "official annotations (v2_OpenEnded_mscoco_train2014_questions.json)", None)
    eval_questions: str | None = doc("vqa: the questions file beside `eval` (VQAv2 official annotations)", None)
    image_root: str = doc("folder the annotations' image paths are relative to", "")
    eval_image_root: str | None = doc("image folder of `eval` (None: image_root)", None)
    train_split: str = doc("split taken from Karpathy's dataset_*.json for training (restval joins train)", "train")
    eval_split: str = doc("split taken from Karpathy's dataset_*.json for evaluation", "test")
    shard_records: int = doc("records per prepared parquet shard (the annotations and their images are packed "
                             "once into shards under <storage_path>/<run_name>/finetune_shards)", 2000, ge=1)


@dataclass
class VqaSection:
    question_encoder_from: str | None = doc(
        "vqa: where the Q-Former's text path comes from (word/position embeddings and text FFNs; BLIP-2 stage 2 "
        "dropped them): a stage-1 export, a Blip2ForImageTextRetrieval directory (Salesforce/blip2-itm-vit-g), a "
        "LAVIS stage-1 .pth or bert-base-uncased; None: model.init_from when it is a stage-1 source. Not used "
        "when the starting model already reads questions (a VQA export: InstructBlipForConditionalGeneration)",
        None)
    prompt: str = doc("vqa: the prompt the question is written into, for the Q-Former and the LLM, in training "
                      "and evaluation ('': BLIP-2's: decoders 'Question: {} Answer:', FlanT5 'Question: {} Short "
                      "answer:')", "")


@dataclass
class VisionTrainingSection:
    freeze_vit: bool = doc("keep the ViT trunk frozen (pre-training's setting); fine-tuning trains it", False)
    grad_checkpointing: bool = doc("recompute each ViT block in backward instead of keeping its activations "
                                   "(LAVIS use_grad_checkpoint; needed at 364 px with ViT-g)", False)
    layer_decay: float = doc("layer-wise lr decay of the ViT: block i of L trains at lr * decay^(L - i), the "
                             "patch embeddings at decay^(L+1); 1: off", 1.0, gt=0, le=1)
    drop_path: float = doc("stochastic depth of the ViT: the largest per-sample drop rate of a block's residual "
                           "update (linear from 0 at the first block to this at the last); 0: off", 0.0, ge=0, lt=1)

    def validate(self) -> None:
        if self.freeze_vit:
            used = [k for k, on in (("grad_checkpointing", self.grad_checkpointing), ("drop_path", self.drop_path > 0),
                                    ("layer_decay", self.layer_decay != 1)) if on]
            if used:
                raise ValueError(f"{', '.join(used)} apply to a trained ViT; with freeze_vit true remove them")


@dataclass
class FinetuneEvalSection:
    zero_shot: bool = doc("also evaluate the starting model (model.hf_path / model.init_from) before training, "
                          "so the report shows the metric before and after", False)
    limit: int | None = doc("evaluate only the first N images (smoke runs; vqa: questions)", None)
    vqa_rules: Literal["lavis", "official"] = doc("vqa: answer scoring rules (the evaluation job's vqa_rules: lavis "
                                                  "= LAVIS's copy of the VQA evaluator, official = GT-Vision-Lab's)",
                                                  "lavis")
    meteor: bool | None = doc("caption: METEOR (the evaluation job's meteor: null where java is present, true "
                              "requires it, false skips it)", None)
    generation: GenerationConfig = doc("caption / vqa generation (lengths count new tokens only)",
                                       factory=GenerationConfig)
    retrieval: RetrievalConfig = doc("retrieval re-ranking settings", factory=RetrievalConfig)
    compute: EvalComputeConfig = doc("the evaluation's Ray actor pool", factory=EvalComputeConfig)


@dataclass
class FinetuneTrainConfig(TrainConfig):
    """Pre-training's optimisation keys with LAVIS caption_coco_ft.yaml's values as defaults."""

    max_steps: int = doc("optimizer steps of the whole run (COCO Karpathy train, 5 epochs at 128: 22,139)", 22_139)
    global_batch_size: int = doc("samples per optimizer step over all workers (LAVIS: 16 per GPU x 8)", 128)
    micro_batch_size: int = doc("samples per forward/backward on one worker", 16)
    lr: float = doc("peak learning rate", 1e-5)
    min_lr: float | None = doc("cosine floor", 0.0)
    warmup_steps: int = doc("linear warmup steps from warmup_start_lr to lr", 1000)
    warmup_start_lr: float = doc("lr at step 0 of the warmup", 1e-8)
    betas: list[float] = doc("AdamW betas", factory=lambda: [0.9, 0.999])


@dataclass
class FinetuneConfig(PretrainConfig):
    task: Literal["caption", "vqa", "retrieval", "instruct"] = doc(
        "downstream task (paper sections 4.2-4.4; instruct: InstructBLIP's instruction tuning)", "caption")
    stage: int = doc("derived from task (caption / vqa: 2, retrieval: 1); setting it is an error unless it agrees",
                     0)
    run_name: str = doc("Ray Train run name: a rerun with the same name resumes from its latest checkpoint",
                        "blip2_finetune")
    output_dir: str = doc("final HF export (caption / vqa: Blip2ForConditionalGeneration + processor; retrieval: "
                          "the Blip2ForImageTextRetrieval layout) and finetune_report.json", "outputs/finetune")
    train: FinetuneTrainConfig = doc("optimisation and schedule (defaults: LAVIS caption_coco_ft)",
                                     factory=FinetuneTrainConfig)
    annotations: AnnotationSection = doc("annotation files and image folders", factory=AnnotationSection)
    vision_training: VisionTrainingSection = doc("how the ViT trains", factory=VisionTrainingSection)
    evaluation: FinetuneEvalSection = doc("evaluation of the held-out annotations", factory=FinetuneEvalSection)
    vqa: VqaSection = doc("vqa: the question-aware Q-Former and the prompt", factory=VqaSection)
    instruct: InstructSection = doc("instruct: the instruction data sources, held in and held out",
                                    factory=InstructSection)
    llm_lora: LlmLoraSection = doc("LoRA adapters on the frozen LLM (caption / vqa / instruct)",
                                   factory=LlmLoraSection)

    STAGE1_INIT_FROM = True  # fine-tuned retrieval starts from a stage-1 export

    def validate(self) -> None:
        stage = TASK_STAGE[self.task]
        if self.stage not in (0, stage):
            raise ValueError(f"stage {self.stage} contradicts task {self.task} (stage {stage}); leave stage unset")
        self.stage = stage
        super().validate()
        if self.task == "instruct":
            self._check_instruct()
        elif not self.annotations.train:
            raise ValueError("annotations.train must name the training annotation JSON")
        if self.task == "vqa":
            self._derive_vqa_prompts()
        if self.llm_lora.enabled and self.stage != 2:
            raise ValueError(f"llm_lora adapts the LLM, which task {self.task} has none of; set llm_lora.r: 0")
        if self.deepspeed.zero_stage == 3 and not self.vision_training.freeze_vit:
            # the ZeRO-3 build (train/zero3.py) partitions the ViT as a frozen part in its storage dtype
            raise ValueError("fine-tuning with the ViT trained runs on deepspeed.zero_stage 2 (ZeRO-2 shards the "
                             "ViT's optimizer state and gradients); ZeRO-3 with a trained ViT is not supported yet")

    @property
    def task_name(self) -> str:
        """The task this config trains (train/tasks.TASKS): the fine-tuning task."""
        return self.task

    def _check_instruct(self) -> None:
        """InstructBLIP keeps the ViT and the LLM frozen; each row carries its own instruction."""
        self.instruct.check()
        if not self.vision_training.freeze_vit:
            raise ValueError("task instruct trains the Q-Former with the ViT frozen (InstructBLIP); set "
                             "vision_training.freeze_vit: true")
        if self.model.llm.prompt:
            raise ValueError("task instruct writes each row's instruction as its prompt; remove model.llm.prompt")
        if self.annotations.train or self.annotations.eval:
            raise ValueError("task instruct reads its files from instruct.sources; remove annotations.train / eval")

    def _derive_vqa_prompts(self) -> None:
        """One prompt for training and evaluation: vqa.prompt, else BLIP-2's for the LLM kind."""
        from blip2_ray.data.processor import vqa_template

        prompt = self.vqa.prompt or vqa_template(self.model.llm.kind)
        if prompt.count("{}") != 1:
            raise ValueError(f"vqa.prompt must hold one {{}} for the question, got {prompt!r}")
        if self.model.llm.prompt:
            raise ValueError("task vqa writes each question into vqa.prompt; remove model.llm.prompt")
        self.vqa.prompt = prompt
        self.data.vqa_prompt = prompt
        self.evaluation.generation.prompt = prompt
