"""The question-aware Q-Former of VQA fine-tuning (BLIP-2 paper section 4.3): the question's text tokens
join the 32 queries in the Q-Former's self-attention, so the queries extract the image features that
question needs; the queries alone cross-attend to the image. Ray-free.

The module is transformers' `InstructBlipQFormerModel` (word + position embeddings, the LayerNorm over
queries and text, layers with a text FFN and a query FFN), so a VQA model's state dict is the one of
`InstructBlipForConditionalGeneration`, and its export loads there unchanged (weights/hf_format.py). A stage-2
model becomes question-aware with the text path read from where it was trained (weights/question_encoder.py).
"""

from __future__ import annotations

import torch
from torch import nn


def takes_question(qformer: nn.Module) -> bool:
    """Whether `qformer` reads text tokens next to the queries (an InstructBlipQFormerModel)."""
    return hasattr(qformer, "embeddings") and hasattr(qformer.embeddings, "word_embeddings")


def question_qformer_config(qformer_config, vocab_size: int):
    """The InstructBlipQFormerConfig of a Blip2QFormerConfig with a text vocabulary of `vocab_size`."""
    from transformers import InstructBlipQFormerConfig

    data = qformer_config.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "use_qformer_text_input"):
        data.pop(k, None)
    data["vocab_size"] = vocab_size
    return InstructBlipQFormerConfig(**data)


def question_pass(qformer: nn.Module, queries: torch.Tensor, image_embeds: torch.Tensor,
                  question_ids: torch.Tensor | None, question_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, Q, H) query outputs of the question-aware Q-Former: queries + question tokens (B, L) in one
    bidirectional self-attention, the queries cross-attending to `image_embeds`; no question: queries only."""
    mask = None
    if question_ids is not None:
        ones = torch.ones(queries.shape[:2], dtype=torch.long, device=queries.device)
        mask = torch.cat([ones, question_mask if question_mask is not None else torch.ones_like(question_ids)], 1)
    out = qformer(input_ids=question_ids, attention_mask=mask, query_embeds=queries,
                  encoder_hidden_states=image_embeds.to(queries.dtype))
    return out.last_hidden_state[:, : queries.shape[1]]
