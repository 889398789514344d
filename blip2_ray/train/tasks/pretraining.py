"""The two pre-training tasks of the paper (section 3): stage 1, the Q-Former's representation learning
against the frozen ViT (ITC + ITM + ITG on Q-Former tokens), and stage 2, generative learning with the
frozen LLM (the language-modelling loss on LLM tokens). Neither evaluates at the end of training.
"""

from __future__ import annotations

from blip2_ray.train.tasks.base import TaskSpec, batch_tensors


class Stage1Pretraining(TaskSpec):
    """Blip2Stage1; batches hold Q-Former tokens; ITC/ITM negatives gathered over the ranks without gradient."""

    name, stage = "stage1", 1

    def build_model(self, cfg, construction=None):
        from blip2_ray.weights.builders import build_stage1

        return build_stage1(cfg.model, construction=construction)

    def tokenizer_dirs(self, cfg):
        from blip2_ray.weights.tokenizer_paths import qformer_tokenizer_dir

        return qformer_tokenizer_dir(cfg.model), None

    def forward(self, engine, batch, rank):
        from blip2_ray.train.distributed import all_gather_no_grad

        pixels, ids, mask = batch_tensors(batch, engine.device, self.stage)
        return engine(pixels, ids, mask, rank=rank, gather=all_gather_no_grad)  # nothing is gathered with gradient

    def export_tokenizers(self, cfg, module):
        from blip2_ray.weights.tokenizer_paths import qformer_tokenizer

        return qformer_tokenizer(cfg.model), None


class Stage2Pretraining(TaskSpec):
    """Blip2Stage2; batches hold LLM tokens (caption and its end, right padded)."""

    name, stage = "stage2", 2

    def build_model(self, cfg, construction=None):
        from blip2_ray.weights.builders import build_stage2

        return build_stage2(cfg.model, construction=construction)

    def tokenizer_dirs(self, cfg):
        from blip2_ray.weights.tokenizer_paths import llm_tokenizer_dir

        return None, llm_tokenizer_dir(cfg.model)

    def check_inputs(self, cfg):
        from blip2_ray.errors import UserError
        from blip2_ray.weights.builders import ZERO3_HF_PATH

        if cfg.deepspeed.zero_stage == 3 and cfg.model.hf_path:
            raise UserError(ZERO3_HF_PATH)

    def forward(self, engine, batch, rank):
        return engine(*batch_tensors(batch, engine.device, self.stage))

    def export_tokenizers(self, cfg, module):
        from blip2_ray.weights.tokenizer_paths import llm_tokenizer

        return llm_tokenizer(cfg.model), None
