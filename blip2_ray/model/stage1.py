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
from blip2_ray.model.precision import Float32Linear, autocast_off
from blip2_ray.model.qformer import QFormerLMHead, build_qformer, init_query_tokens
from blip2_ray.model.qformer_passes import (
    KeysValues,
    concat_images,
    decoder_mask,
    embed_input,
    image_keys_values,
    key_padding_mask,
    run_layers,
    select_images,
)
from blip2_ray.model.vision import DTYPES, construct_vision_model, encode_image, freeze_vision, ln_vision, vision_trunk


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
        self.vision_model = vision_model if vision_model is not None else construct_vision_model(cfg.vision)
        freeze_vision(self.vision_model, DTYPES[cfg.vision.dtype])
        self.query_tokens = init_query_tokens(q.num_query_tokens, q.hidden_size, q.initializer_range)
        self.qformer = build_qformer(q, cfg.vision.hidden_size, vocab_size, with_text=True)
        self.embeddings = Blip2TextEmbeddings(self.qformer.config)
        self.embeddings.apply(self.qformer._init_weights)
        # float32 even under autocast: ITC features and ITM logits (model/precision.py)
        self.vision_projection = Float32Linear(q.hidden_size, q.embed_dim)
        self.text_projection = Float32Linear(q.hidden_size, q.embed_dim)
        self.itm_head = Float32Linear(q.hidden_size, 2)
        self.lm_head = QFormerLMHead(q.hidden_size, vocab_size, eps=self.qformer.config.layer_norm_eps)
        self.temp = nn.Parameter(torch.tensor(q.temp_init))

    objectives = losses.Objectives()  # model/compile.py sets compiled ones on an instance

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision_model.eval()  # frozen: dropout / norm statistics never change
        return self

    # ---- building blocks (each usable alone: serving, evaluation and the benchmark time them) ----
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, N, D) float32 image tokens after the trainable ln_vision."""
        return encode_image(self.vision_model, pixel_values)

    def image_keys_values(self, image_embeds: torch.Tensor) -> list[KeysValues | None]:
        """(B, N, D) image tokens -> each cross-attention layer's keys/values, computed once per image."""
        return image_keys_values(self.qformer, image_embeds)

    def query_pass(self, image_kv: list[KeysValues | None], keep_kv: bool = False):
        """Queries through the Q-Former (they see queries and the image) -> ((B, Q, H), per-layer cache).

        With `keep_kv` the cache holds each layer's self-attention keys/values of the queries: the ITG
        decoder attends to them (as the reference's `past_key_values`), gradient included.
        """
        batch = next(kv for kv in image_kv if kv is not None)[0].shape[0]
        queries = embed_input(self.qformer, self.query_tokens.expand(batch, -1, -1))
        return run_layers(self.qformer, queries, None, query_length=queries.shape[1], image_kv=image_kv,
                          keep_kv=keep_kv)

    def query_features(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, N, D) image tokens -> (B, Q, H) query outputs (queries see queries and the image)."""
        return self.query_pass(self.image_keys_values(image_embeds))[0]

    def image_feats(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, Q, E) L2-normalised float32 ITC image features."""
        return self._image_feats_from_queries(self.query_features(image_embeds))

    def _image_feats_from_queries(self, query_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.vision_projection(query_hidden), dim=-1)  # Float32Linear: float32 features

    def text_feat(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) caption tokens -> (B, E) L2-normalised float32 ITC text feature of [CLS] (text-only pass)."""
        text = embed_input(self.qformer, self.embeddings(input_ids=input_ids))
        h, _ = run_layers(self.qformer, text, key_padding_mask(attention_mask), outputs=1)
        return F.normalize(self.text_projection(h[:, 0]), dim=-1)

    def itm_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 2) float32 ITM logits: queries + text, full bidirectional attention, head averaged over queries."""
        return self.itm_logits_from_kv(self.image_keys_values(image_embeds), input_ids, attention_mask)

    def itm_logits_from_kv(self, image_kv: list[KeysValues | None], input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
        """`itm_logits` with the images given as their cross-attention keys/values (one row per text)."""
        b, nq = input_ids.shape[0], self.query_tokens.shape[1]
        embeds = self.embeddings(input_ids=input_ids, query_embeds=self.query_tokens.expand(b, -1, -1))
        ones = torch.ones(b, nq, dtype=attention_mask.dtype, device=attention_mask.device)
        keep = torch.cat([ones, attention_mask], 1)
        h, _ = run_layers(self.qformer, embed_input(self.qformer, embeds), key_padding_mask(keep), query_length=nq,
                          image_kv=image_kv, outputs=nq)
        with autocast_off(h.device.type):  # itm_head is a Float32Linear; the mean stays float32 too
            return self.itm_head(h).mean(dim=1)

    def itg_hidden(self, query_cache: list[KeysValues], dec_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H) ITG decoder states: text attends to the cached queries and to its own past."""
        text = embed_input(self.qformer, self.embeddings(input_ids=dec_ids))
        nq = query_cache[0][0].shape[2]
        h, _ = run_layers(self.qformer, text, decoder_mask(nq, attention_mask), prefix_kv=query_cache)
        return h

    def itg_logits(self, image_embeds: torch.Tensor, dec_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, V) float32 LM logits at every text position (the step itself projects only labelled ones)."""
        _, cache = self.query_pass(self.image_keys_values(image_embeds), keep_kv=True)
        return self.lm_head(self.itg_hidden(cache, dec_ids, attention_mask), self.embeddings.word_embeddings.weight)

    # ---- the stage-1 step ----
    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        rank: int = 0,
        gather: losses.Gather = losses.identity_gather,
        generator: torch.Generator | None = None,
    ) -> Stage1Output:
        """ITC + ITM + ITG on one local batch; `gather` concatenates over ranks (no gradient).

        pixel_values (B, 3, H, W); input_ids / attention_mask (B, T) from the Q-Former tokenizer
        ([CLS] first). Batches must have the same B on every rank (ITC targets assume it).
        Nothing is gathered with gradient: ITM's negative images travel as frozen trunk output (see below).
        """
        ls = self.cfg.qformer.label_smoothing
        trunk = vision_trunk(self.vision_model, pixel_values)  # (B, N, D) frozen, no grad
        image_embeds = ln_vision(self.vision_model, trunk)  # (B, N, D) float32
        image_kv = self.image_keys_values(image_embeds)  # shared by ITC and ITM
        b = image_embeds.shape[0]

        # ITC; the query pass keeps its keys/values for ITG
        query_hidden, query_cache = self.query_pass(image_kv, keep_kv=True)
        image_feats = self._image_feats_from_queries(query_hidden)  # (B, Q, E)
        text_feat = self.text_feat(input_ids, attention_mask)  # (B, E)
        sim_i2t, sim_t2i, loss_itc = self.objectives.itc(image_feats, text_feat, gather(image_feats.detach()),
                                                         gather(text_feat.detach()), self.temp, rank, ls)

        # ITM with hard negatives from the global batch
        neg_img, neg_txt = losses.sample_hard_negatives(sim_i2t, sim_t2i, rank, generator)
        local = torch.arange(b, device=neg_img.device)
        if sim_i2t.shape[1] == b:  # world size 1: every negative image is a local one, its keys/values exist
            itm_kv = select_images(image_kv, torch.cat([local, neg_img, local]))
        else:
            # Negative images from any rank: gather the frozen trunk output (no gradient) and apply
            # ln_vision here. Its parameter gradient lands on this rank instead of the image's owner;
            # ln_vision is replicated and its gradient summed over ranks, so the update is the same
            # as gathering ln_vision's output with gradient, without all-reducing activations.
            negatives = ln_vision(self.vision_model, gather(trunk)[neg_img])
            itm_kv = concat_images(image_kv, self.image_keys_values(negatives), image_kv)
        ids_world, mask_world = gather(input_ids), gather(attention_mask)
        itm_ids = torch.cat([input_ids, input_ids, ids_world[neg_txt]])
        itm_mask = torch.cat([attention_mask, attention_mask, mask_world[neg_txt]])
        loss_itm = self.objectives.itm_loss(self.itm_logits_from_kv(itm_kv, itm_ids, itm_mask), b)

        # ITG: [DEC] replaces [CLS]; padding and the last position get no loss (every position goes through the
        # LM head, as in the reference: selecting the labelled ones would be a data-dependent shape)
        loss_itg = self.itg_loss(query_cache, input_ids, attention_mask, ls)

        return Stage1Output(loss_itc + loss_itm + loss_itg, loss_itc, loss_itm, loss_itg)

    def itg_loss(self, query_cache: list[KeysValues], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 label_smoothing: float) -> torch.Tensor:
        """The ITG loss of the captions given the query pass's cache: [DEC] replaces [CLS], padding is ignored."""
        dec_ids = input_ids.clone()
        dec_ids[:, 0] = self.dec_token_id
        targets = losses.itg_targets(dec_ids.masked_fill(attention_mask == 0, -100))
        hidden = self.itg_hidden(query_cache, dec_ids, attention_mask).flatten(0, 1)  # (B*T, H)
        logits = self.lm_head(hidden, self.embeddings.word_embeddings.weight)
        return self.objectives.itg_loss(logits, targets, label_smoothing)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
