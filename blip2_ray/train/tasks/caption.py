"""Caption fine-tuning (paper section 4.2): stage 2's language-modelling loss on COCO captions, the ViT trained;
evaluated by the caption job (BLEU, METEOR, ROUGE-L, CIDEr, SPICE)."""

from __future__ import annotations

import copy
import os

from blip2_ray.train.tasks.finetuning import Finetuning
from blip2_ray.train.tasks.pretraining import Stage2Pretraining


class CaptionFinetuning(Finetuning, Stage2Pretraining):
    name = "caption"

    def resolve_start(self, cfg):
        """`model.init_from` naming a Blip2ForConditionalGeneration directory (a stage-2 export or Salesforce's
        BLIP-2) becomes `model.hf_path`: the whole model starts from it."""
        from blip2_ray.train.finetune_model import config_json
        from blip2_ray.weights.builders import is_stage2_dir_config

        m = cfg.model
        if m.init_from and os.path.isdir(m.init_from) and is_stage2_dir_config(config_json(m.init_from)):
            cfg = copy.deepcopy(cfg)
            cfg.model.hf_path, cfg.model.init_from = cfg.model.init_from, None
        return cfg

    def start_dir(self, cfg):
        return cfg.model.hf_path
