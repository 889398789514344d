"""The stage-1 Q-Former passes on HF's layer modules, with the keys/values passed explicitly.

transformers' `Blip2QFormerLayer.forward` has no key/value cache, and it projects the image tokens to
cross-attention keys/values inside every call. The stage-1 step needs both:

- ITG reuses the query pass's self-attention keys/values, as the reference does with
  `past_key_values`: the text decoder attends to them under a causal text mask instead of re-running
  the queries with cross-attention through every layer;
- the image tokens' cross-attention keys/values (257 tokens x 1408 -> 768, twice, in 6 layers: the
  largest matmuls of the Q-Former) are computed once per image and shared by ITC and ITM.

The functions run each layer's own submodules (`attention.attention.query/key/value`,
`attention.output`, `crossattention`, the query and text FFNs), so the weights keep HF's names and
values; the tests compare every loss and gradient with HF's own layer forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KeysValues = tuple[torch.Tensor, torch.Tensor]  # (B, heads, L, head_dim) keys and values


def _heads(x: torch.Tensor, attention: nn.Module) -> torch.Tensor:
    """(B, L, H) -> (B, heads, L, head_dim)."""
    b, n, _ = x.shape
    return x.view(b, n, attention.num_attention_heads, attention.attention_head_size).transpose(1, 2)


def _attend(attention: nn.Module, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention of `attention` (an HF Blip2QFormerMultiHeadAttention) -> (B, L, H)."""
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, scale=attention.scaling,
        dropout_p=attention.attention_dropout if attention.training else 0.0,
    )
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def embed_input(qformer: nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """The Q-Former's input LayerNorm and dropout (per token: queries and text may go in separately)."""
    return qformer.dropout(qformer.layernorm(embeds))


def image_keys_values(qformer: nn.Module, image_embeds: torch.Tensor) -> list[KeysValues | None]:
    """(B, N, D) image tokens -> for each layer its cross-attention (keys, values), None without one."""
    out: list[KeysValues | None] = []
    for layer in qformer.encoder.layer:
        if not layer.has_cross_attention:
            out.append(None)
            continue
        attention = layer.crossattention.attention
        out.append((_heads(attention.key(image_embeds), attention), _heads(attention.value(image_embeds), attention)))
    return out


def select_images(image_kv: list[KeysValues | None], index: torch.Tensor) -> list[KeysValues | None]:
    """Rows `index` (M,) of every layer's image keys/values: pairs an image with several texts, no recompute."""
    return [None if kv is None else (kv[0][index], kv[1][index]) for kv in image_kv]


def concat_images(*image_kvs: list[KeysValues | None]) -> list[KeysValues | None]:
    """Concatenate per-layer image keys/values along the batch."""
    return [None if kvs[0] is None else (torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs]))
            for kvs in zip(*image_kvs)]


def run_layers(
    qformer: nn.Module,
    hidden: torch.Tensor,
    self_mask: torch.Tensor | None,
    *,
    query_length: int = 0,
    image_kv: list[KeysValues | None] | None = None,
    prefix_kv: list[KeysValues] | None = None,
    keep_kv: bool = False,
    outputs: int | None = None,
) -> tuple[torch.Tensor, list[KeysValues]]:
    """(B, L, H) input (after `embed_input`; queries first, then text) -> (B, L, H) hidden states.

    The first `query_length` positions cross-attend to `image_kv` and use the query FFN; the rest use
    the text FFN and never see the image. `self_mask`: None (all positions see all), or a boolean
    (B, 1, L or 1, P + L) mask, True = may attend, over the keys `prefix_kv` (P positions per layer,
    e.g. a query pass's cache) followed by this input's own. `keep_kv`: also return each layer's
    self-attention (keys, values) of this input, the cache a later pass can take as `prefix_kv`.
    `outputs`: return only the first `outputs` positions (B, outputs, H); in the last layer the other
    positions are then only keys/values (ITM reads the queries, the text pass [CLS]).
    """
    kept: list[KeysValues] = []
    last = len(qformer.encoder.layer) - 1
    for i, layer in enumerate(qformer.encoder.layer):
        args = (hidden, self_mask, query_length, None if image_kv is None else image_kv[i],
                None if prefix_kv is None else prefix_kv[i], outputs if i == last else None)
        # a layer compiled by model/compile.py runs the step through its own module call (its hooks, e.g.
        # ZeRO-3's parameter gathering, run around the compiled step); otherwise the step runs here
        hidden, kv = layer(LAYER_STEP, *args) if getattr(layer, "runs_layer_step", False) else layer_step(layer, *args)
        if keep_kv:
            kept.append(kv)
    return hidden, kept


LAYER_STEP = "blip2_ray.qformer_layer_step"  # first argument of a compiled layer's call: run `layer_step`


def layer_step(layer: nn.Module, hidden: torch.Tensor, self_mask: torch.Tensor | None, query_length: int,
               image_kv: KeysValues | None, prefix_kv: KeysValues | None,
               outputs: int | None) -> tuple[torch.Tensor, KeysValues]:
    """One Q-Former layer of `run_layers` -> (hidden, this input's self-attention (keys, values)).

    A pure function of its tensors and the layer's weights (no host read of a value): model/compile.py
    compiles it once for every layer.
    """
    attention = layer.attention.attention
    own = _heads(attention.key(hidden), attention), _heads(attention.value(hidden), attention)
    keys, values = own
    if prefix_kv is not None:
        keys, values = torch.cat([prefix_kv[0], keys], 2), torch.cat([prefix_kv[1], values], 2)
    if outputs is not None:
        hidden = hidden[:, :outputs]
        if self_mask is not None and self_mask.shape[2] > 1:
            self_mask = self_mask[:, :, :outputs]
    context = _attend(attention, _heads(attention.query(hidden), attention), keys, values, self_mask)
    attended = layer.attention.output(context, hidden)
    parts = []
    if query_length:
        queries = attended[:, :query_length]
        if layer.has_cross_attention:
            cross = layer.crossattention
            image_keys, image_values = image_kv
            context = _attend(cross.attention, _heads(cross.attention.query(queries), cross.attention),
                              image_keys, image_values, None)
            queries = cross.output(context, queries)
        parts.append(layer.feed_forward_chunk_query(queries))
    if attended.shape[1] > query_length:
        parts.append(layer.feed_forward_chunk(attended[:, query_length:]))
    return (torch.cat(parts, 1) if len(parts) > 1 else parts[0]), own


def key_padding_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, L) 1/0 keep mask -> (B, 1, 1, L) boolean attention mask (True = may attend) for every row."""
    return keep.bool()[:, None, None, :]


def decoder_mask(num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """ITG: (B, T) text keep mask -> (B, 1, T, Q + T) boolean mask over [cached queries, text].

    Text token t sees every query and the text tokens <= t that are not padding (queries never see
    text: they come from the query pass).
    """
    b, t = text_mask.shape
    causal = torch.ones(t, t, dtype=torch.bool, device=text_mask.device).tril()
    text = causal[None] & text_mask.bool()[:, None, :]  # (B, T, T)
    queries = torch.ones(b, t, num_queries, dtype=torch.bool, device=text_mask.device)
    return torch.cat([queries, text], 2)[:, None]
