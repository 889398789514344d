"""Stage 1: the Q-Former learns vision-language representations against the frozen ViT.

Attribute names follow transformers' `Blip2ForImageTextRetrieval` (`vision_model`, `query_tokens`,
`embeddings`, `qformer`, `vision_projection`, `text_projection`, `itm_head`) so the state dict moves
to and from it unchanged; `lm_head` and `temp` are the stage-1 extras HF lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from blip2_ray.model import losses
from blip2_ray.model.config import ModelConfig
from blip2_ray.model.precision import Float32Linear
from blip2_ray.model.qformer import (
    QFormerLMHead,
    build_qformer,
    init_query_tokens,
    itg_mask,
    padding_mask,
    run_qformer,
)
from blip2_ray.model.vision import DTYPES, build_vision_model, encode_image, freeze_vision


@dataclass
class Stage1Output:
    loss: torch.Tensor
    loss_itc: torch.Tensor
    loss_itm: torch.Tensor
    loss_itg: torch.Tensor

    def components(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("loss", "loss_itc", "loss_itm", "loss_itg")}


class Blip2Stage1(nn.Module):
    """Frozen ViT + trainable ln_vision, queries, Q-Former, projections, ITM head, LM head, temperature.

    `dec_token_id` / `pad_token_id` come from the Q-Former tokenizer (BERT + `[DEC]`). `vision_model`:
    the image encoder built by the caller (builders.build_stage1: from its weight source, in its
    storage dtype); None builds a random one from `cfg.vision`.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, dec_token_id: int, pad_token_id: int = 0,
                 vision_model: nn.Module | None = None):
        super().__init__()
        from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

        q = cfg.qformer
        self.cfg = cfg
        self.dec_token_id = dec_token_id
        self.pad_token_id = pad_token_id
        self.vision_model = vision_model if vision_model is not None else build_vision_model(cfg.vision)
        freeze_vision(self.vision_model, DTYPES[cfg.vision.dtype])
        self.query_tokens = init_query_tokens(q.num_query_tokens, q.hidden_size)
        self.qformer = build_qformer(q, cfg.vision.hidden_size, vocab_size, with_text=True)
        self.embeddings = Blip2TextEmbeddings(self.qformer.config)
        self.embeddings.apply(self.qformer._init_weights)
        # float32 even under autocast: ITC features and ITM logits (model/precision.py)
        self.vision_projection = Float32Linear(q.hidden_size, q.embed_dim)
        self.text_projection = Float32Linear(q.hidden_size, q.embed_dim)
        self.itm_head = Float32Linear(q.hidden_size, 2)
        self.lm_head = QFormerLMHead(q.hidden_size, vocab_size, eps=self.qformer.config.layer_norm_eps)
        self.temp = nn.Parameter(torch.tensor(q.temp_init))

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_model.eval()  # frozen: dropout / norm statistics never change
        return self

    # ---- building blocks (each usable alone: serving, evaluation and the benchmark time them) ----
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) float32 image tokens after the trainable ln_vision."""
        return encode_image(self.vision_model, pixel_values)

    def query_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, D) image tokens -> (B, Q, H) query outputs (queries see queries and the image)."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        return run_qformer(self.qformer, queries, None, image_embeds, query_length=queries.shape[1])

    def image_feats(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, Q, E) L2-normalised ITC image features."""
        return F.normalize(self.vision_projection(self.query_features(image_embeds)), dim=-1)

    def text_feat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) caption tokens -> (B, E) L2-normalised ITC text feature of [CLS] (text-only pass)."""
        h = run_qformer(self.qformer, self.embeddings(input_ids=input_ids), padding_mask(attention_mask, self.temp.dtype))
        return F.normalize(self.text_projection(h[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 2) ITM logits: queries + text with full bidirectional attention, head averaged over queries."""
        b, nq = image_embeds.shape[0], self.query_tokens.shape[1]
        queries = self.query_tokens.expand(b, -1, -1)
        embeds = self.embeddings(input_ids=input_ids, query_embeds=queries)
        mask = torch.cat([torch.ones(b, nq, dtype=attention_mask.dtype, device=attention_mask.device), attention_mask], 1)
        h = run_qformer(self.qformer, embeds, padding_mask(mask, embeds.dtype), image_embeds, query_length=nq)
        return self.itm_head(h[:, :nq]).mean(dim=1)

    def itg_logits(self, image_embeds: torch.Tensor, dec_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) LM logits at the text positions under the ITG mask."""
        b, nq = image_embeds.shape[0], self.query_tokens.shape[1]
        queries = self.query_tokens.expand(b, -1, -1)
        embeds = self.embeddings(input_ids=dec_ids, query_embeds=queries)
        mask = itg_mask(nq, attention_mask, embeds.dtype)
        h = run_qformer(self.qformer, embeds, mask, image_embeds, query_length=nq)
        return self.lm_head(h[:, nq:], self.embeddings.word_embeddings.weight)

    # ---- the stage-1 step ----
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        rank: int = 0,
        gather: losses.Gather = losses.identity_gather,
        gather_with_grad: losses.Gather = losses.identity_gather,
        generator: torch.Generator | None = None,
    ) -> Stage1Output:
        """ITC + ITM + ITG on one local batch; `gather`/`gather_with_grad` concatenate over ranks.

        pixel_values (B, 3, H, W); input_ids / attention_mask (B, T) from the Q-Former tokenizer
        ([CLS] first). Batches must have the same B on every rank (ITC targets assume it).
        """
        ls = self.cfg.qformer.label_smoothing
        image_embeds = self.encode_image(pixel_values)  # (B, N, D)
        b = image_embeds.shape[0]

        # ITC
        image_feats = self.image_feats(image_embeds)  # (B, Q, E)
        text_feat = self.text_feat(input_ids, attention_mask)  # (B, E)
        sim_i2t, sim_t2i = losses.itc_similarities(image_feats, text_feat, self.temp, gather)
        loss_itc = losses.itc_loss(sim_i2t, sim_t2i, rank, ls)

        # ITM with hard negatives from the global batch; negative images keep their gradient
        neg_img, neg_txt = losses.sample_hard_negatives(sim_i2t, sim_t2i, rank, generator)
        image_world = gather_with_grad(image_embeds)
        ids_world, mask_world = gather(input_ids), gather(attention_mask)
        itm_images = torch.cat([image_embeds, image_world[neg_img], image_embeds])
        itm_ids = torch.cat([input_ids, input_ids, ids_world[neg_txt]])
        itm_mask = torch.cat([attention_mask, attention_mask, mask_world[neg_txt]])
        loss_itm = losses.itm_loss(self.itm_logits(itm_images, itm_ids, itm_mask), b)

        # ITG: [DEC] replaces [CLS]; padding gets no loss
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        labels = dec_ids.masked_fill(attention_mask == 0, -100)
        loss_itg = losses.itg_loss(self.itg_logits(image_embeds, dec_ids, attention_mask), labels, ls)

        return Stage1Output(loss_itc + loss_itm + loss_itg, loss_itc, loss_itm, loss_itg)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
