"""The fine-tuning config sections of instruction tuning (`instruct`, task instruct) and of LoRA on the LLM
(`llm_lora`, every stage-2 fine-tuning task). Checked before Ray starts (config validation)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from blip2_ray.config_fields import doc


@dataclass
class InstructSourceSection:
    name: str = doc("the source's name (held_in / held_out name it; its shards go to finetune_shards/<name>)", "")
    kind: Literal["caption", "vqa", "vqg", "conversation"] = doc(
        "task kind: caption (templates without a placeholder, response = the caption), vqa ('{}' = the question, "
        "response = one human answer drawn per visit), vqg ('{}' = the answer, response = the question), "
        "conversation (LLaVA-Instruct: '{}' = the human turn, response = the gpt turn)", "vqa")
    train: str | None = doc("training annotation file (held-in sources; formats: blip2_ray/data/instruct.py)", None)
    questions: str | None = doc("VQAv2's official questions file beside `train` (vqa / vqg)", None)
    image_root: str = doc("folder the image paths of `train` are relative to", "")
    split: str = doc("split taken from Karpathy's dataset_*.json for training (restval joins train)", "train")
    eval: str | None = doc("held-out annotations of this source, evaluated at the end (and zero-shot before "
                           "training with evaluation.zero_shot); None: not evaluated", None)
    eval_questions: str | None = doc("VQAv2's official questions file beside `eval`", None)
    eval_image_root: str | None = doc("image folder of `eval` (None: image_root)", None)
    eval_split: str = doc("split taken from Karpathy's dataset_*.json for evaluation", "test")
    templates: list[str] | None = doc("instruction templates, one drawn per visit ('{}' where the question / "
                                      "answer / human turn goes); None: the paper's for the kind", None)
    eval_template: str | None = doc("the evaluation prompt's template (None: the source's first template)", None)
    weight: float | None = doc("sampling weight overriding the paper's sqrt(rows) (relative to the sqrt weights "
                               "of the other sources); None: sqrt(rows)", None)
    metric: Literal["vqa_accuracy", "exact_match", "cider"] | None = doc(
        "evaluation metric (None: vqa -> vqa_accuracy, caption / vqg -> cider; exact_match for one-answer sets "
        "such as GQA)", None)


@dataclass
class InstructSection:
    sources: list[InstructSourceSection] = doc("the instruction data sources (kind, files, templates, weight)",
                                               factory=list)
    held_in: list[str] = doc("names of the sources trained on (their eval files measure held-in performance)",
                             factory=list)
    held_out: list[str] = doc("names of the sources never trained on, evaluated zero-shot (their eval files)",
                              factory=list)
    qformer_text_from: str | None = doc(
        "where the instruction-aware Q-Former's text path comes from (word/position embeddings and text FFNs, "
        "which a BLIP-2 stage-2 model no longer has): bert-base-uncased (what InstructBLIP starts from), a "
        "stage-1 export, a Blip2ForImageTextRetrieval directory or a LAVIS stage-1 .pth; not used when the "
        "starting model already reads text (an InstructBlipForConditionalGeneration directory)", None)

    def by_name(self) -> dict[str, InstructSourceSection]:
        return {s.name: s for s in self.sources}

    def check(self) -> None:
        """Checks of task instruct (names, held-in / held-out split, files named); ValueError. Not `validate`:
        the section is checked only when the task is instruct."""
        names = [s.name for s in self.sources]
        if not self.sources:
            raise ValueError("instruct.sources is empty; name at least one source (kind, train, image_root)")
        bad = [n for n in names if not n or "/" in n or n in (".", "..")]
        if bad:
            raise ValueError(f"instruct.sources: every source needs a name without '/', got {bad[0]!r}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"instruct.sources: the name {dup[0]!r} is used twice")
        for key in ("held_in", "held_out"):
            unknown = [n for n in getattr(self, key) if n not in names]
            if unknown:
                raise ValueError(f"instruct.{key} names {unknown[0]!r}, which is no source; sources: "
                                 f"{', '.join(names)}")
        both = [n for n in self.held_out if n in self.held_in]
        if both:
            raise ValueError(f"instruct source {both[0]!r} is held out and also held in: a held-out source must "
                             f"never be trained on; remove it from instruct.held_in or instruct.held_out")
        if not self.held_in:
            raise ValueError("instruct.held_in is empty; name the sources to train on")
        src = self.by_name()
        trained = {}
        for n in self.held_in:
            s = src[n]
            if not s.train:
                raise ValueError(f"held-in instruct source {n!r} names no train file")
            if s.kind == "conversation" and s.eval:
                raise ValueError(f"instruct source {n!r}: conversation sources have no evaluation metric; remove "
                                 f"its eval file")
            trained[_abs(s.train)] = n
        for n in self.held_out:
            s = src[n]
            if not s.eval:
                raise ValueError(f"held-out instruct source {n!r} names no eval file: a held-out source is only "
                                 f"evaluated (zero-shot)")
            if s.kind == "conversation":
                raise ValueError(f"held-out instruct source {n!r}: conversation sources have no evaluation metric")
            for f in (s.eval, s.train):
                if f and _abs(f) in trained:
                    raise ValueError(f"held-out instruct source {n!r} reads {f!r}, which held-in source "
                                     f"{trained[_abs(f)]!r} trains on: a held-out source must never be trained on")
        for s in self.sources:
            if s.weight is not None and s.weight < 0:
                raise ValueError(f"instruct source {s.name!r}: weight must be >= 0, got {s.weight}")
            if s.eval_template is not None and s.kind != "caption" and "{}" not in s.eval_template:
                raise ValueError(f"instruct source {s.name!r}: eval_template needs '{{}}' for the "
                                 f"{'question' if s.kind == 'vqa' else 'text'}, got {s.eval_template!r}")

    def evaluated(self) -> list[tuple[str, InstructSourceSection]]:
        """("held_in" | "held_out", source) of every source with an eval file, held-in first."""
        src = self.by_name()
        return [("held_in", src[n]) for n in self.held_in if src[n].eval] + \
            [("held_out", src[n]) for n in self.held_out]


@dataclass
class LlmLoraSection:
    r: int = doc("LoRA rank of the adapters on the frozen LLM (peft); 0: off, the LLM stays wholly frozen", 0, ge=0)
    alpha: float = doc("LoRA alpha: the adapters' update is scaled by alpha / r", 16.0)
    dropout: float = doc("dropout on the adapters' input (training only)", 0.05, ge=0, lt=1)
    target_modules: list[str] | None = doc(
        "names of the LLM's linear modules that get adapters (e.g. [q_proj, v_proj]; T5: [q, v]); None: peft's "
        "default for the LLM family (the attention query and value projections). A name the LLM lacks is an "
        "error naming the modules it has", None)
    save_adapter: bool = doc("also write the adapters alone, in peft's format, to <output_dir>/llm_lora_adapter "
                             "(the export itself has them merged into the LLM's weights)", True)

    def validate(self) -> None:
        if self.r and self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is empty; name modules or leave it null for peft's default")

    @property
    def enabled(self) -> bool:
        return self.r > 0


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))
