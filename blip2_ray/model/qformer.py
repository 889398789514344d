"""The Q-Former: BERT-base with cross-attention every 2nd layer, learned queries and two FFNs per layer.

Built on transformers' `Blip2QFormerModel` (its layers already route query positions through the
query FFN and cross-attention, text positions through the text FFN), so weights share HF's names.
What HF lacks for stage 1 is written here (the BERT LM head tied to the word embeddings) and in
`qformer_passes` (the passes with explicit keys/values, the objectives' attention masks).
"""

from __future__ import annotations

import torch
from torch import nn

from blip2_ray.model.config import QFormerConfig
from blip2_ray.model.precision import at_least_float32, autocast_off


def build_qformer(cfg: QFormerConfig, vision_width: int, vocab_size: int, with_text: bool = True) -> nn.Module:
    """An HF `Blip2QFormerModel` (random init); `with_text` adds the text FFNs stage 1 needs."""
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    hf_cfg = Blip2QFormerConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
        max_position_embeddings=cfg.max_position_embeddings, cross_attention_frequency=cfg.cross_attention_frequency,
        encoder_hidden_size=vision_width, use_qformer_text_input=with_text,
        initializer_range=cfg.initializer_range,
    )
    return Blip2QFormerModel(hf_cfg)


def init_query_tokens(num_queries: int, hidden: int, std: float = 0.02) -> nn.Parameter:
    """(1, Q, H) learned queries, normal(0, std) as in the reference (std: the Q-Former's initializer_range)."""
    return nn.Parameter(torch.randn(1, num_queries, hidden) * std)


def run_qformer(
    qformer: nn.Module,
    embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_embeds: torch.Tensor | None = None,
    query_length: int = 0,
) -> torch.Tensor:
    """(B, L, H) embeddings (queries first, then text) -> (B, L, H) hidden states.

    `attention_mask` is an additive (B, 1, L or 1, L) mask; the first `query_length` positions use the
    query FFN and cross-attend to `image_embeds` in the cross-attention layers.
    """
    x = qformer.dropout(qformer.layernorm(embeds))
    if image_embeds is not None:
        image_embeds = image_embeds.to(x.dtype)
    out = qformer.encoder(
        x, attention_mask=attention_mask, encoder_hidden_states=image_embeds, query_length=query_length
    )
    return out.last_hidden_state


class QFormerLMHead(nn.Module):
    """BERT's masked-LM head (dense -> GELU -> LayerNorm -> decoder tied to the word embeddings + bias)."""

    def __init__(self, hidden: int, vocab_size: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V) float32 logits (the whole head runs in float32 under autocast)."""
        with autocast_off(hidden.device.type):  # float32 ITG logits even under autocast (model/precision.py)
            h = self.layer_norm(nn.functional.gelu(self.dense(at_least_float32(hidden))))
            return nn.functional.linear(h, at_least_float32(word_embeddings), self.bias)
