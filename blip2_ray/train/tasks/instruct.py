"""Instruction tuning (InstructBLIP, Dai et al. 2023, arXiv 2305.06500): the instruction goes to the
instruction-aware Q-Former next to the queries (model/question_qformer.py) and to the LLM; the loss is on the
response only; the ViT and the LLM stay frozen (LoRA adapters on the LLM optional: llm_lora); the Q-Former starts
from a BLIP-2 stage-2 model. The data are several sources mixed by sqrt(size) (data/instruct.py), each packed
into its own shards; the end of training evaluates every held-in and held-out source (eval/instruct.py)."""

from __future__ import annotations

import os

from blip2_ray.train.tasks.vqa import VqaFinetuning


class InstructFinetuning(VqaFinetuning):
    name = "instruct"
    rows = "instructions"

    def read_annotations(self, cfg):
        """Every held-in source's rows (bad input counted per reason), and every eval file checked."""
        from blip2_ray.data.instruct import read_instruct_source
        from blip2_ray.errors import UserError

        self.check_text_path(cfg)
        src = cfg.instruct.by_name()
        out = []
        for name in cfg.instruct.held_in:
            s = src[name]
            out.append(read_instruct_source(name, s.kind, s.train, s.image_root, questions=s.questions,
                                            templates=s.templates, split=s.split,
                                            max_caption_words=cfg.data.max_caption_words))
        for _, s in cfg.instruct.evaluated():
            for key in ("eval", "eval_questions"):
                value = getattr(s, key)
                if value and not os.path.isfile(value):
                    raise UserError(f"instruct source {s.name!r}: {key} {value!r} does not exist")
        return out

    def shards_fingerprint(self, cfg):
        from blip2_ray.errors import UserError

        raise UserError("task instruct packs one shard folder per source next to the checkpoints and needs a local "
                        "storage_path (or a shared file system); s3:// storage is not supported for it yet")

    def pack_shards(self, cfg, ann, out_dir):
        from blip2_ray.data.instruct_shards import sampling_weights, sources_fingerprint, write_instruct_shards

        src = cfg.instruct.by_name()
        shares = sampling_weights({s.name: len(s.entries) for s in ann}, {s.name: src[s.name].weight for s in ann})
        files = [(src[s.name].train, src[s.name].image_root, src[s.name].split) for s in ann]
        files += [(src[s.name].questions, src[s.name].image_root, "questions") for s in ann if src[s.name].questions]
        extra = [[src[s.name].kind, src[s.name].templates, shares[s.name]] for s in ann]
        fp = sources_fingerprint(files, [extra, cfg.data.max_caption_words, cfg.annotations.shard_records])
        return write_instruct_shards(ann, shares, out_dir, cfg.annotations.shard_records, fp)

    def packed_line(self, cfg, manifest, seconds: float) -> str:
        per = "; ".join(f"{n} ({s['kind']}) {s['rows']} rows, share {s['share']:.3f}"
                        + (f", skipped {s['skipped']}" if s["skipped"] else "")
                        for n, s in manifest["sources"].items())
        return (f"[finetune] {manifest['rows']} training instructions of {manifest['images']} images from "
                f"{len(manifest['sources'])} held-in sources in {len(manifest['files'])} shards ({seconds:.1f} s): "
                f"{per}")

    def has_evaluation(self, cfg) -> bool:
        return bool(cfg.instruct.evaluated())

    def evaluate(self, cfg, model_dir, output):
        from blip2_ray.eval.instruct import evaluate_instruct

        e = cfg.evaluation
        return evaluate_instruct(cfg.instruct.evaluated(), model_dir, output, generation=e.generation,
                                 compute=e.compute, data=cfg.data, limit=e.limit, vqa_rules=e.vqa_rules,
                                 max_caption_words=cfg.data.max_caption_words)
