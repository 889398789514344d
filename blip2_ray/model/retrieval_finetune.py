"""Retrieval fine-tuning: the stage-1 objectives with image ids, so that captions of one image (COCO has
five) are never negatives of each other, and the ViT trained.

As LAVIS' BLIP-2 retrieval fine-tune: ITC targets spread over every caption of the same image in the global
batch (then label smoothing), ITM hard negatives drawn only from other images, ITG unchanged. The building
blocks are Blip2Stage1's; only the targets and the negative draw differ from pre-training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blip2_ray.model import losses
from blip2_ray.model.precision import autocast_off
from blip2_ray.model.stage1 import Blip2Stage1, Stage1Output


def same_image(image_ids: torch.Tensor, gather: losses.Gather = losses.identity_gather) -> torch.Tensor:
    """(B, W*B) bool: local sample b and global sample n show the same image (image_ids (B,) int64)."""
    return image_ids[:, None] == gather(image_ids)[None, :]


def itc_loss_by_image(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, same: torch.Tensor,
                      label_smoothing: float = 0.1) -> torch.Tensor:
    """ITC with targets uniform over the global samples of the same image, smoothed as cross_entropy does:
    (1 - s) * target + s / N. With one caption per image it equals losses.itc_loss."""
    target = same.float() / same.float().sum(1, keepdim=True)
    target = (1 - label_smoothing) * target + label_smoothing / same.shape[1]
    with autocast_off(sim_i2t.device.type):
        i2t = -(F.log_softmax(sim_i2t.float(), 1) * target).sum(1).mean()
        t2i = -(F.log_softmax(sim_t2i.float(), 1) * target).sum(1).mean()
    return (i2t + t2i) / 2


@torch.no_grad()
def hard_negatives_of_other_images(sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, same: torch.Tensor,
                                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(neg_image_idx, neg_text_idx) (B,) global indices drawn from softmax(similarity) with every sample of the
    same image at probability 0 (uniform over the other images when the softmax mass underflows)."""
    if not (~same).any(1).all():
        raise ValueError("an ITM hard negative needs another image in the global batch; every sample of a row "
                         "shows the same image (raise the batch size or shuffle more)")

    def weights(sim: torch.Tensor) -> torch.Tensor:
        w = torch.nan_to_num(torch.softmax(sim.float(), 1).masked_fill(same, 0.0), nan=0.0, posinf=0.0, neginf=0.0)
        empty = w.sum(1, keepdim=True) <= 0
        return torch.where(empty, (~same).float(), w)

    return losses.draw_one(weights(sim_t2i), generator), losses.draw_one(weights(sim_i2t), generator)


class Blip2RetrievalFinetune(Blip2Stage1):
    """Blip2Stage1 whose step takes `image_ids`; its ViT trains when vision.unfreeze_vision made it trainable."""

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self.vision_model, "vit_training", None) is not None:
            self.vision_model.train(mode)
        return self

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                image_ids: torch.Tensor, rank: int = 0, gather: losses.Gather = losses.identity_gather,
                gather_with_grad: losses.Gather = losses.identity_gather,
                generator: torch.Generator | None = None) -> Stage1Output:
        """ITC + ITM + ITG as Blip2Stage1.forward, with `image_ids` (B,) int64 deciding positives and negatives."""
        ls = self.cfg.qformer.label_smoothing
        image_embeds = self.encode_image(pixel_values)
        b = image_embeds.shape[0]
        same = same_image(image_ids, gather)
        query_hidden, query_cache = self.query_pass(self.image_keys_values(image_embeds), keep_kv=True)
        sim_i2t, sim_t2i = losses.itc_similarities(self._image_feats_from_queries(query_hidden),
                                                   self.text_feat(input_ids, attention_mask), self.temp, gather)
        loss_itc = itc_loss_by_image(sim_i2t, sim_t2i, same, ls)
        neg_img, neg_txt = hard_negatives_of_other_images(sim_i2t, sim_t2i, same, generator)
        # the ViT trains: negative images are gathered with gradient (LAVIS's retrieval fine-tune does too)
        image_world = gather_with_grad(image_embeds)
        ids_world, mask_world = gather(input_ids), gather(attention_mask)
        itm_logits = self.itm_logits(torch.cat([image_embeds, image_world[neg_img], image_embeds]),
                                     torch.cat([input_ids, input_ids, ids_world[neg_txt]]),
                                     torch.cat([attention_mask, attention_mask, mask_world[neg_txt]]))
        loss_itm = self.objectives.itm_loss(itm_logits, b)
        loss_itg = self.itg_loss(query_cache, input_ids, attention_mask, ls)  # as Blip2Stage1's
        return Stage1Output(loss_itc + loss_itm + loss_itg, loss_itc, loss_itm, loss_itg)
