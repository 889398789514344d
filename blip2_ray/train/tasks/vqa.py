"""VQA fine-tuning (paper section 4.3): the question is written into the prompt, read by the LLM and by a
question-aware Q-Former (model/question_qformer.py); the loss is on the answer only; evaluated by the VQA job
(VQAv2 accuracy). Rows are VQAv2 official files or LAVIS lists (data/annotations.py)."""

from __future__ import annotations

from blip2_ray.train.tasks.base import batch_tensors
from blip2_ray.train.tasks.caption import CaptionFinetuning


class VqaFinetuning(CaptionFinetuning):
    name = "vqa"
    rows = "questions"

    def build_model(self, cfg, construction=None):
        from blip2_ray.train.finetune_model import question_encoder_key, question_encoder_source
        from blip2_ray.weights.question_encoder import make_question_aware

        model = super().build_model(cfg, construction)
        if not model.takes_question:
            make_question_aware(model, question_encoder_source(cfg), question_encoder_key(cfg)[0])
        return model

    def tokenizer_dirs(self, cfg):
        from blip2_ray.train.finetune_model import question_tokenizer_dir
        from blip2_ray.weights.tokenizer_paths import llm_tokenizer_dir

        return question_tokenizer_dir(cfg), llm_tokenizer_dir(cfg.model)  # the question goes to the Q-Former too

    def forward(self, engine, batch, rank):
        from blip2_ray.train.batches import device_tensors

        pixels, ids, mask = batch_tensors(batch, engine.device, self.stage)
        moved = device_tensors(batch, engine.device)  # prepared in the feed thread (batches.prepare_batch)
        # loss on the answer: the first llm_prompt_length tokens of a row are the prompt with the question
        return engine(pixels, ids, mask, prompt_lengths=moved["llm_prompt_length"],
                      question_ids=moved["qformer_input_ids"], question_mask=moved["qformer_attention_mask"])

    def export_tokenizers(self, cfg, module):
        from blip2_ray.train.finetune_model import question_tokenizer_dir
        from blip2_ray.weights.tokenizers import load_qformer_tokenizer

        tokenizer, _ = super().export_tokenizers(cfg, module)
        return tokenizer, load_qformer_tokenizer(question_tokenizer_dir(cfg))  # InstructBlipProcessor keeps both

    def check_text_path(self, cfg) -> None:
        """The Q-Former's text path source exists and holds one (unless the start model reads text already)."""
        from blip2_ray.train.finetune_model import question_encoder_key, question_encoder_source, starts_question_aware

        if not starts_question_aware(cfg):
            from blip2_ray.weights.question_encoder import text_path_source

            text_path_source(question_encoder_source(cfg), question_encoder_key(cfg)[0])

    def read_annotations(self, cfg):
        from blip2_ray.data.annotations import read_vqa_annotations

        self.check_text_path(cfg)
        a = cfg.annotations
        return read_vqa_annotations(a.train, a.questions, a.image_root, "annotations.train")

    def shards_fingerprint(self, cfg) -> str:
        from blip2_ray.data.annotations import fingerprint

        a = cfg.annotations
        fp = super().shards_fingerprint(cfg)
        return fp + (fingerprint(a.questions, a.image_root, "questions") if a.questions else "")

    def pack_shards(self, cfg, ann, out_dir):
        from blip2_ray.data.annotations import write_vqa_shards

        return write_vqa_shards(ann, out_dir, cfg.annotations.shard_records, self.shards_fingerprint(cfg))
