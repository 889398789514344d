"""Retrieval fine-tuning (paper section 4.4): stage 1's objectives with image ids, so that captions of one image
are never negatives of each other (model/retrieval_finetune.py), the ViT trained; evaluated by the retrieval
job (ITC top-k re-ranked by ITM, R@1/5/10 both ways)."""

from __future__ import annotations

import os

from blip2_ray.train.tasks.base import batch_tensors
from blip2_ray.train.tasks.finetuning import Finetuning
from blip2_ray.train.tasks.pretraining import Stage1Pretraining


class RetrievalFinetuning(Finetuning, Stage1Pretraining):
    name = "retrieval"

    def host_tensors(self, batch, cfg):
        from blip2_ray.train.batches import check_retrieval_batch
        from blip2_ray.train.finetune_model import image_ids_of_keys

        image_ids = image_ids_of_keys(batch["key"])
        check_retrieval_batch(image_ids, cfg.scaling.num_workers)
        return {"image_ids": image_ids}

    def forward(self, engine, batch, rank):
        from blip2_ray.train.batches import device_tensors
        from blip2_ray.train.distributed import all_gather_no_grad, all_gather_with_grad

        pixels, ids, mask = batch_tensors(batch, engine.device, self.stage)
        # the ViT trains, so ITM's negative images are gathered with gradient (as LAVIS's retrieval fine-tune);
        # captions of one image are never negatives of each other: the image ids computed in batches.prepare_batch
        image_ids = device_tensors(batch, engine.device).get("image_ids")
        if image_ids is None:  # a batch prepared without the config (tests): from its keys now
            from blip2_ray.train.finetune_model import image_ids_of_keys

            image_ids = image_ids_of_keys(batch["key"]).to(engine.device)
        return engine(pixels, ids, mask, rank=rank, gather=all_gather_no_grad,
                      gather_with_grad=all_gather_with_grad, image_ids=image_ids)

    def start_dir(self, cfg):
        init = cfg.model.init_from
        return init if init and os.path.isfile(os.path.join(init, "config.json")) else None
