"""Checkpoint layouts as rename tables: each real source file, key by key, onto our (= HF's) names.

A `Layout` is data: ordered `Rule`s (regex on the source key -> our key, or dropped with the reason),
the target keys it must supply, how a block index is found (blocks past the configured depth are
dropped: BLIP-2 keeps 39 of EVA's 40 blocks and 23 of CLIP's 24) and which shape differences are
resolved and how. `plan_conversion` maps a file's keys through a layout (a key no rule knows is an
error); `convert_tensors` reads the planned tensors in the target dtype. Tests write each layout at
tiny size exactly as the real file has it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial

import torch

from blip2_ray.errors import UserError
from blip2_ray.model.partitioned import full_shape, is_partitioned
from blip2_ray.model.vision import interpolate_position_embedding
from blip2_ray.weights.checkpoint_files import LazyTensors


@dataclass(frozen=True)
class Rule:
    source: str  # regex matched against the whole source key
    target: str | None  # re.sub template giving our key; None: the key is dropped (`why` says why)
    why: str = ""
    also: str | None = None  # a second key that receives the same tensor (BERT's FFN -> the query FFN)
    part: str | None = None  # one part of a merged tensor: EVA's "q" and "v" biases -> the qkv bias


@dataclass(frozen=True)
class Layout:
    name: str
    what: str  # the real file this describes, for messages and docs
    rules: tuple[Rule, ...]
    provides: str  # regex over our keys: every model key it matches must come from this source
    layer: str | None = None  # regex whose group 1 is a source key's block index
    fits: dict[str, str] = field(default_factory=dict)  # our-key regex -> "grid" | "rows_prefix" | "rows_truncate"


@dataclass
class Plan:
    layout: Layout
    label: str  # the file(s), for messages
    sources: dict[str, list[tuple[str, str | None]]]  # our key -> [(source key, part)]
    dropped: dict[str, str]  # source key -> why


def _drop(pattern: str, why: str) -> Rule:
    return Rule(pattern, None, why)


def _layer_norm(src: str, dst: str, also: str | None = None) -> tuple[Rule, ...]:
    """BERT as published names LayerNorm parameters gamma/beta (transformers renames them at load)."""
    return (Rule(rf"^{src}\.(?:gamma|weight)$", f"{dst}.weight", also=also and f"{also}.weight"),
            Rule(rf"^{src}\.(?:beta|bias)$", f"{dst}.bias", also=also and f"{also}.bias"))


def _bert_ends(prefix: str, head: str) -> tuple[Rule, ...]:
    """A BERT's embeddings under `prefix` and its masked-LM head (cls.predictions) under `head` (regexes), as
    bert-base-uncased is published and as LAVIS's Qformer holds them: embeddings + LayerNorm, head -> lm_head."""
    return (
        Rule(rf"^{prefix}embeddings\.(word_embeddings|position_embeddings)\.weight$", r"embeddings.\1.weight"),
        *_layer_norm(rf"{prefix}embeddings\.LayerNorm", "qformer.layernorm"),
        _drop(rf"^{prefix}embeddings\.position_ids$", "a buffer the model computes itself"),
        Rule(rf"^{head}cls\.predictions\.transform\.dense\.(weight|bias)$", r"lm_head.dense.\1"),
        *_layer_norm(rf"{head}cls\.predictions\.transform\.LayerNorm", "lm_head.layer_norm"),
        Rule(rf"^{head}cls\.predictions\.bias$", "lm_head.bias"),
        _drop(rf"^{head}cls\.predictions\.decoder\.(weight|bias)$", "tied to the word embeddings and predictions.bias"),
    )


def _eva_rules(src: str, dst: str) -> tuple[Rule, ...]:
    """EVA ViT-g (LAVIS `eva_vit.py`) -> transformers' Blip2VisionModel, under prefixes src/dst."""
    s = re.escape(src)
    return (
        Rule(rf"^{s}cls_token$", f"{dst}embeddings.class_embedding"),
        Rule(rf"^{s}pos_embed$", f"{dst}embeddings.position_embedding"),
        Rule(rf"^{s}patch_embed\.proj\.(weight|bias)$", rf"{dst}embeddings.patch_embedding.\1"),
        Rule(rf"^{s}blocks\.(\d+)\.norm([12])\.(weight|bias)$", rf"{dst}encoder.layers.\1.layer_norm\2.\3"),
        Rule(rf"^{s}blocks\.(\d+)\.attn\.qkv\.weight$", rf"{dst}encoder.layers.\1.self_attn.qkv.weight"),
        # EVA has q and v biases and no k bias; HF has one qkv bias: cat(q_bias, 0, v_bias)
        Rule(rf"^{s}blocks\.(\d+)\.attn\.q_bias$", rf"{dst}encoder.layers.\1.self_attn.qkv.bias", part="q"),
        Rule(rf"^{s}blocks\.(\d+)\.attn\.v_bias$", rf"{dst}encoder.layers.\1.self_attn.qkv.bias", part="v"),
        Rule(rf"^{s}blocks\.(\d+)\.attn\.proj\.(weight|bias)$", rf"{dst}encoder.layers.\1.self_attn.projection.\2"),
        Rule(rf"^{s}blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", rf"{dst}encoder.layers.\1.mlp.\2.\3"),
        _drop(rf"^{s}(norm|fc_norm|head)\.(weight|bias)$",
              "EVA's final norm and classifier head (LAVIS comments them out: BLIP-2 reads the blocks' output)"),
    )


VIT_PROVIDES = r"^(embeddings|encoder)\."  # the trunk; post_layernorm (ln_vision) is trainable and optional
_GRID = {r"embeddings\.position_embedding(\.weight)?$": "grid"}

EVA_VIT = Layout(
    "eva_vit_g.pth", "LAVIS's EVA ViT-g checkpoint (blocks.N.attn.qkv.weight, q_bias/v_bias, pos_embed, cls_token)",
    _eva_rules("", ""), VIT_PROVIDES, layer=r"^blocks\.(\d+)\.", fits=_GRID,
)

_NOT_THE_VIT = "the rest of the BLIP-2 model (only its ViT is read from here)"
# what a whole BLIP-2 directory holds besides its ViT
_BESIDES_THE_VIT = (
    _drop(r"^(qformer|language_model|language_projection|vision_projection|text_projection|itm_head|embeddings)\.",
          _NOT_THE_VIT),
    _drop(r"^query_tokens$", _NOT_THE_VIT))
BLIP2_DIR_VIT = Layout(
    "blip2_dir", "a whole BLIP-2 directory (Blip2ForConditionalGeneration / Blip2ForImageTextRetrieval)",
    (Rule(r"^vision_model\.(embeddings|encoder|post_layernorm)\.(.+)$", r"\1.\2"), *_BESIDES_THE_VIT),
    VIT_PROVIDES, layer=r"^vision_model\.encoder\.layers\.(\d+)\.", fits=_GRID,
)

HF_VIT = Layout(
    "blip2_vision_dir", "a ViT-only HF directory (Blip2VisionModel.save_pretrained)",
    (Rule(r"^(embeddings|encoder|post_layernorm)\.(.+)$", r"\1.\2"),),
    VIT_PROVIDES, layer=r"^encoder\.layers\.(\d+)\.", fits=_GRID,
)

_CLIP_TEXT = "CLIP's text tower, projections and temperature (BLIP-2 uses the image tower only)"
CLIP_VIT = Layout(
    "clip_dir", "a CLIP HF directory (CLIPVisionModel or CLIPModel, e.g. openai/clip-vit-large-patch14)",
    (_drop(r"^(vision_model\.)?embeddings\.position_ids$", "a buffer the model computes itself"),
     Rule(r"^(?:vision_model\.)?(embeddings|pre_layrnorm|encoder|post_layernorm)\.(.+)$", r"clip.\1.\2"),
     _drop(r"^text_model\.", _CLIP_TEXT), _drop(r"^(visual_projection|text_projection)\.", _CLIP_TEXT),
     _drop(r"^logit_scale$", _CLIP_TEXT)),
    r"^clip\.(embeddings|pre_layrnorm|encoder)\.", layer=r"^(?:vision_model\.)?encoder\.layers\.(\d+)\.", fits=_GRID,
)

# the ViT of our own CLIP ViT-L export format (weights/native_format.py): ClipVisionTower's names under vision_model.
NATIVE_CLIP_VIT = Layout(
    "blip2_ray_clip_dir", "a blip2_ray export with a CLIP ViT-L (vision_model.clip.* + vision_model.post_layernorm)",
    (Rule(r"^vision_model\.(clip\..+|post_layernorm\..+)$", r"\1"), *_BESIDES_THE_VIT),
    CLIP_VIT.provides, layer=r"^vision_model\.clip\.encoder\.layers\.(\d+)\.", fits=_GRID,
)

_L = r"(?:bert\.)?encoder\.layer\.(\d+)"
_Q = r"qformer.encoder.layer.\1"
BERT = Layout(
    "bert", "bert-base-uncased as published (BertForPreTraining keys under bert., LayerNorm gamma/beta, cls. head)",
    (
        *_bert_ends(r"(?:bert\.)?", ""),
        Rule(rf"^{_L}\.attention\.self\.(query|key|value)\.(weight|bias)$", rf"{_Q}.attention.attention.\2.\3"),
        Rule(rf"^{_L}\.attention\.output\.dense\.(weight|bias)$", rf"{_Q}.attention.output.dense.\2"),
        *_layer_norm(rf"{_L}\.attention\.output\.LayerNorm", rf"{_Q}.attention.output.LayerNorm"),
        # the query FFN of each layer starts as a copy of BERT's FFN (cross-attention stays random)
        Rule(rf"^{_L}\.intermediate\.dense\.(weight|bias)$", rf"{_Q}.intermediate.dense.\2",
             also=rf"{_Q}.intermediate_query.dense.\2"),
        Rule(rf"^{_L}\.output\.dense\.(weight|bias)$", rf"{_Q}.output.dense.\2", also=rf"{_Q}.output_query.dense.\2"),
        *_layer_norm(rf"{_L}\.output\.LayerNorm", rf"{_Q}.output.LayerNorm", also=rf"{_Q}.output_query.LayerNorm"),
        _drop(r"^cls\.seq_relationship\.(weight|bias)$", "BERT's next-sentence-prediction head"),
        _drop(r"^(?:bert\.)?pooler\.dense\.(weight|bias)$", "BERT's pooler"),
        _drop(r"^(?:bert\.)?embeddings\.token_type_embeddings\.weight$", "token-type embeddings (one segment)"),
    ),
    r"^(embeddings\.|qformer\.layernorm\.|qformer\.encoder\.layer\.\d+\."
    r"(attention|intermediate|output|intermediate_query|output_query)\.|lm_head\.)",
    # BLIP-2 adds [DEC] to BERT's vocabulary: that row (and its LM bias) keeps its init
    fits={r"^embeddings\.word_embeddings\.weight$": "rows_prefix", r"^lm_head\.bias$": "rows_prefix",
          r"^embeddings\.position_embeddings\.weight$": "rows_truncate"},
)

_QL = r"^Qformer\.bert\.encoder\.layer\.(\d+)"
LAVIS_BLIP2 = Layout(
    "lavis.pth", "a LAVIS BLIP-2 checkpoint (blip2/blip2_qformer stage 1, blip2_opt/blip2_t5 stage 2)",
    (
        *_eva_rules("visual_encoder.", "vision_model."),
        Rule(r"^ln_vision\.(weight|bias)$", r"vision_model.post_layernorm.\1"),
        *_bert_ends(r"Qformer\.bert\.", r"Qformer\."),
        Rule(rf"{_QL}\.(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)$",
             r"qformer.encoder.layer.\1.\2.attention.\3.\4"),
        Rule(rf"{_QL}\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)$",
             r"qformer.encoder.layer.\1.\2.output.\3.\4"),
        Rule(rf"{_QL}\.(intermediate|intermediate_query)\.dense\.(weight|bias)$",
             r"qformer.encoder.layer.\1.\2.dense.\3"),
        Rule(rf"{_QL}\.(output|output_query)\.(dense|LayerNorm)\.(weight|bias)$", r"qformer.encoder.layer.\1.\2.\3.\4"),
        Rule(r"^query_tokens$", "query_tokens"),
        Rule(r"^vision_proj\.(weight|bias)$", r"vision_projection.\1"),
        Rule(r"^text_proj\.(weight|bias)$", r"text_projection.\1"),
        Rule(r"^itm_head\.(weight|bias)$", r"itm_head.\1"),
        Rule(r"^temp$", "temp"),
        Rule(r"^(?:opt_proj|t5_proj)\.(weight|bias)$", r"language_projection.\1"),
        _drop(r"^(opt_model|t5_model)\.", "the frozen LLM, which comes from model.llm.path"),
    ),
    r"^(query_tokens|temp)$|^(qformer|embeddings|lm_head|vision_projection|text_projection|itm_head)\."
    r"|^vision_model\.post_layernorm\.",
    layer=r"^visual_encoder\.blocks\.(\d+)\.", fits={r"^vision_model\.embeddings\.position_embedding$": "grid"},
)

# our stage-1 export (Blip2ForImageTextRetrieval + stage1_extras.safetensors): our own names
STAGE1_EXPORT = Layout(
    "stage1_export", "a stage-1 export or Blip2ForImageTextRetrieval directory",
    (Rule(r"^(vision_model|qformer|embeddings|lm_head|vision_projection|text_projection|itm_head)\.(.+)$", r"\1.\2"),
     Rule(r"^(query_tokens|temp)$", r"\1")),
    LAVIS_BLIP2.provides, layer=r"^vision_model\.encoder\.layers\.(\d+)\.",
)

VISION_LAYOUTS = (EVA_VIT, BLIP2_DIR_VIT, HF_VIT, CLIP_VIT, NATIVE_CLIP_VIT)
CLIP_LAYOUTS = (CLIP_VIT, NATIVE_CLIP_VIT)

# what a stage-1 source holds that the stage-2 model does not use (dropped by name when stage 2 starts
# from a stage-1 checkpoint): the text side of the Q-Former and the stage-1 heads
STAGE2_UNUSED = (
    (r"^(embeddings|lm_head|vision_projection|text_projection|itm_head)\.|^temp$", "stage-1 heads and text embeddings"),
    (r"^qformer\.encoder\.layer\.\d+\.(intermediate|output)\.", "the Q-Former's text FFN (stage 2 runs queries only)"),
)


def plan_conversion(layout: Layout, keys: list[str], label: str, *, depth: int | None = None,
                    unused: tuple[tuple[str, str], ...] = ()) -> Plan:
    """Map `keys` of the file `label` through `layout`; a key no rule knows is one UserError.

    `depth`: blocks with an index >= depth are dropped. `unused`: (regex over our keys, why) the
    target model does not have (e.g. STAGE2_UNUSED).
    """
    sources: dict[str, list[tuple[str, str | None]]] = {}
    dropped: dict[str, str] = {}
    unknown = []
    for key in keys:
        if depth is not None and layout.layer:
            m = re.match(layout.layer, key)
            if m and int(m.group(1)) >= depth:
                dropped[key] = f"a block past the configured depth ({depth})"
                continue
        rule = next((r for r in layout.rules if re.match(r.source, key)), None)
        if rule is None:
            unknown.append(key)
            continue
        if rule.target is None:
            dropped[key] = rule.why
            continue
        targets = [re.sub(rule.source, rule.target, key)] + ([re.sub(rule.source, rule.also, key)] if rule.also else [])
        for target in targets:
            why = next((w for pattern, w in unused if re.search(pattern, target)), None)
            if why:
                dropped[key] = why
            else:
                sources.setdefault(target, []).append((key, rule.part))
    if unknown:
        more = f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        raise UserError(f"{label} is not laid out as {layout.what}: no rule for {', '.join(unknown[:4])}{more}")
    return Plan(layout, label, sources, dropped)


def _fit(kind: str, value: torch.Tensor, like: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    if kind == "grid":
        return interpolate_position_embedding(value, shape)
    if kind == "rows_truncate" and value.shape[0] >= shape[0] and value.shape[1:] == shape[1:]:
        return value[: shape[0]]
    if kind == "rows_prefix" and value.shape[0] <= shape[0] and value.shape[1:] == shape[1:] and like is not None:
        out = like.detach().to(value.dtype).clone()
        out[: value.shape[0]] = value
        return out
    return value  # left as is: assign_weights reports the shape mismatch


def convert_tensors(plan: Plan, files, model_state: dict[str, torch.Tensor]) -> LazyTensors:
    """The planned tensors of `files` (TensorFiles-like), each read on lookup in the dtype `model_state` has there.

    `model_state`: the target module's `state_dict(keep_vars=True)` (meta tensors are fine except for
    "rows_prefix" fits, which keep the model's own rows beyond the source's; partitioned parameters count
    with their full shape).
    """
    return LazyTensors({target: partial(_read_target, plan, files, model_state, target, parts)
                        for target, parts in plan.sources.items()})


def _read_target(plan: Plan, files, model_state: dict[str, torch.Tensor], target: str, parts) -> torch.Tensor:
    own = model_state.get(target)
    dtype = own.dtype if own is not None else None
    fit = next((k for pattern, k in plan.layout.fits.items() if re.search(pattern, target)), None)
    read_dtype = torch.float32 if fit == "grid" else dtype  # interpolate in float32, as LAVIS does
    if parts[0][1] is None:
        value = files.get(parts[0][0], read_dtype)
    else:  # the qkv bias: cat(q_bias, zeros, v_bias)
        by_part = {p: files.get(k, read_dtype) for k, p in parts}
        if set(by_part) != {"q", "v"}:
            raise UserError(f"{plan.label}: {target} needs both q_bias and v_bias, found {sorted(by_part)}")
        value = torch.cat([by_part["q"], torch.zeros_like(by_part["q"]), by_part["v"]])
    if own is not None and fit and tuple(value.shape) != full_shape(own):
        like = own if own.device.type != "meta" and not is_partitioned(own) else None
        value = _fit(fit, value, like, full_shape(own))
    return value if dtype is None or value.dtype == dtype else value.to(dtype)


class InMemoryTensors:
    """A state dict behind the TensorFiles interface (for converting tensors already in memory)."""

    def __init__(self, state: dict[str, torch.Tensor], label: str = "state dict"):
        self.state, self.label = state, label

    def keys(self) -> list[str]:
        return list(self.state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.state[key].shape)

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.state[key]
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t
