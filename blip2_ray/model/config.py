"""Model configuration: composed vision / Q-Former / LLM sections and the presets of real sizes.

`ModelConfig(preset="vitg_opt2.7b")` takes every value of that preset; keys given next to `preset`
override it. The `tiny` presets are CPU test sizes (hidden 32, 2 layers, 32 px images) that still
learn on the generated shapes data (random weights by design); the others are the paper's sizes, whose
frozen ViT and LLM must name their weights through the `path` fields (docs/checkpoints.md) unless
`allow_random_init` says a random init is meant.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

from blip2_ray.config import ConfigError, merge
from blip2_ray.config_fields import doc

Dtype = Literal["float32", "float16", "bfloat16"]


@dataclass
class VisionConfig:
    kind: Literal["eva_vit_g", "clip_vit_l"] = doc("frozen image encoder architecture", "eva_vit_g")
    path: str | None = doc(
        "frozen ViT weights: a BLIP-2 dir (its vision_model.*), a Blip2VisionModel dir, a CLIP dir, or LAVIS's "
        "eva_vit_g.pth; layout read from the content (None: from model.init_from, else random)", None)
    hidden_size: int = doc("ViT width", 1408, ge=1)
    intermediate_size: int = doc("ViT MLP width", 6144, ge=1)
    num_layers: int = doc("blocks kept (EVA ViT-g: 39 of 40; CLIP ViT-L: 23 of 24)", 39, ge=1)
    num_heads: int = doc("attention heads", 16, ge=1)
    image_size: int = doc("input resolution in pixels", 224, ge=1)
    patch_size: int = doc("patch size in pixels", 14, ge=1)
    layer_norm_eps: float = doc("LayerNorm epsilon", 1e-6, gt=0)
    ln_vision_eps: float | None = doc(
        "epsilon of ln_vision (null: layer_norm_eps, HF's convention; LAVIS checkpoints were trained with 1e-5)",
        None, gt=0)
    dtype: Dtype = doc("dtype of the frozen weights (ln_vision always trains in float32)", "float16")

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")


def ln_vision_eps(cfg: VisionConfig) -> float:
    """ln_vision's epsilon: `vision.ln_vision_eps`, or the ViT's `layer_norm_eps` (HF's convention)."""
    return cfg.layer_norm_eps if cfg.ln_vision_eps is None else cfg.ln_vision_eps


# ----------------------------------------------------------------------------------------- the ViT


@dataclass
class QFormerConfig:
    tokenizer: str = doc("local bert-base-uncased tokenizer directory, or 'tiny' (built offline)", "tiny")
    init_from_bert: str | None = doc(
        "BERT directory to initialise from (bert-base-uncased as published or saved by transformers; "
        "the query FFN starts as a copy of the text FFN)", None)
    hidden_size: int = doc("Q-Former width", 768, ge=1)
    num_layers: int = doc("transformer layers", 12, ge=1)
    num_heads: int = doc("attention heads", 12, ge=1)
    intermediate_size: int = doc("FFN width", 3072, ge=1)
    cross_attention_frequency: int = doc("cross-attention to the image every N layers", 2, ge=1)
    num_query_tokens: int = doc("learned queries", 32, ge=1)
    embed_dim: int = doc("ITC feature size (vision/text projections)", 256, ge=1)
    vocab_size: int = doc("text vocabulary (0: the tokenizer's length, [DEC] included)", 0, ge=0)
    max_position_embeddings: int = doc("text positions", 512, ge=1)
    max_text_len: int = doc("caption tokens", 32, ge=1)
    dropout: float = doc("hidden and attention dropout", 0.1, ge=0, lt=1)
    initializer_range: float = doc("std of the random init of the Q-Former's weights and queries (BERT's and "
                                   "LAVIS's 0.02; at the tiny widths, e.g. 32, 0.02 leaves attention near uniform "
                                   "and tests train from 0.1)", 0.02, gt=0)
    temp_init: float = doc("initial ITC temperature", 0.07, gt=0)
    label_smoothing: float = doc("label smoothing of ITC and ITG", 0.1, ge=0, lt=1)

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")


@dataclass
class LLMConfig:
    kind: Literal["decoder", "opt", "t5"] = doc(
        "decoder: any AutoModelForCausalLM (OPT, Llama, Qwen2, Mistral, GPT-2...; 'opt' is an alias); "
        "t5: FlanT5", "opt")
    path: str | None = doc("local HF-format LLM directory (None: random init of an OPT / T5 of the sizes below)", None)
    tokenizer: str = doc("local tokenizer directory, or 'tiny' (built offline)", "tiny")
    dtype: Dtype = doc("dtype of the frozen LLM (FlanT5: bfloat16)", "float16")
    hidden_size: int = doc("model width of a random init (OPT hidden_size / T5 d_model)", 2560, ge=1)
    num_layers: int = doc("layers (T5: per stack)", 32, ge=1)
    num_heads: int = doc("attention heads", 32, ge=1)
    ffn_size: int = doc("FFN width (OPT ffn_dim / T5 d_ff)", 10240, ge=1)
    head_dim: int = doc("T5 d_kv", 64, ge=1)
    vocab_size: int = doc("vocabulary (0: the tokenizer's length)", 50272, ge=0)
    max_positions: int = doc("OPT max_position_embeddings", 2048, ge=1)
    max_text_len: int = doc("caption tokens", 32, ge=1)
    prompt: str = doc("training prompt prepended to captions (its tokens get no loss)", "")

    def validate(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")


_EVA_G = dict(kind="eva_vit_g", hidden_size=1408, intermediate_size=6144, num_layers=39, num_heads=16,
              image_size=224, patch_size=14, layer_norm_eps=1e-6, dtype="float16")
_CLIP_L = dict(kind="clip_vit_l", hidden_size=1024, intermediate_size=4096, num_layers=23, num_heads=16,
               image_size=224, patch_size=14, layer_norm_eps=1e-5, dtype="float16")
_BERT_BASE = dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, num_query_tokens=32,
                  vocab_size=30523)
_OPT = {
    "2.7b": dict(kind="opt", hidden_size=2560, num_layers=32, num_heads=32, ffn_size=10240, vocab_size=50272,
                 dtype="float16"),
    "6.7b": dict(kind="opt", hidden_size=4096, num_layers=32, num_heads=32, ffn_size=16384, vocab_size=50272,
                 dtype="float16"),
}
_T5 = {
    "xl": dict(kind="t5", hidden_size=2048, num_layers=24, num_heads=32, ffn_size=5120, head_dim=64,
               vocab_size=32128, dtype="bfloat16"),
    "xxl": dict(kind="t5", hidden_size=4096, num_layers=24, num_heads=64, ffn_size=10240, head_dim=64,
                vocab_size=32128, dtype="bfloat16"),
}
_TINY_VISION = dict(kind="eva_vit_g", hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    image_size=32, patch_size=8, dtype="float32")
_TINY_QFORMER = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_query_tokens=8,
                     embed_dim=16, vocab_size=0, max_position_embeddings=64, tokenizer="tiny")
_TINY_OPT = dict(kind="opt", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, vocab_size=0,
                 max_positions=128, dtype="float32", tokenizer="tiny")
_TINY_T5 = dict(kind="t5", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, head_dim=8, vocab_size=0,
                dtype="float32", tokenizer="tiny")

PRESETS: dict[str, dict] = {
    "tiny": dict(vision=_TINY_VISION, qformer=_TINY_QFORMER, llm=_TINY_OPT),
    "tiny_t5": dict(vision=_TINY_VISION, qformer=_TINY_QFORMER, llm=_TINY_T5),
    "vitg_opt2.7b": dict(vision=_EVA_G, qformer=_BERT_BASE, llm=_OPT["2.7b"]),
    "vitg_opt6.7b": dict(vision=_EVA_G, qformer=_BERT_BASE, llm=_OPT["6.7b"]),
    "vitg_flant5xl": dict(vision=_EVA_G, qformer=_BERT_BASE, llm=_T5["xl"]),
    "vitg_flant5xxl": dict(vision=_EVA_G, qformer=_BERT_BASE, llm=_T5["xxl"]),
    "vitl_opt2.7b": dict(vision=_CLIP_L, qformer=_BERT_BASE, llm=_OPT["2.7b"]),
    "vitl_flant5xl": dict(vision=_CLIP_L, qformer=_BERT_BASE, llm=_T5["xl"]),
}


@dataclass
class ModelConfig:
    preset: str = doc(f"base sizes: one of {', '.join(PRESETS)}; explicit keys override it", "tiny")
    vision: VisionConfig = doc("frozen image encoder", factory=VisionConfig)
    qformer: QFormerConfig = doc("trainable Q-Former", factory=QFormerConfig)
    llm: LLMConfig = doc("frozen language model (stage 2)", factory=LLMConfig)
    init_from: str | None = doc(
        "a stage-1 export dir (or Blip2ForImageTextRetrieval dir) or a LAVIS BLIP-2 .pth to start from: the "
        "queries, Q-Former, ln_vision (+ heads in stage 1, + projection from a stage-2 .pth) and, when it holds "
        "one, the frozen ViT", None)
    hf_path: str | None = doc("stage 2: a whole model in HF format (Blip2ForConditionalGeneration dir) to load", None)
    allow_random_init: bool = doc(
        "allow a non-tiny preset to build its frozen ViT / LLM with random weights (benchmarks, tests)", False)

    @staticmethod
    def apply_preset(data: dict, where: str) -> dict:
        name = data.get("preset", "tiny")
        if name not in PRESETS:
            raise ConfigError(f"{where or 'model'}.preset {name!r} is unknown; valid presets: {', '.join(PRESETS)}")
        return merge(copy.deepcopy(PRESETS[name]), data)


def llm_is_decoder(kind: str) -> bool:
    """`model.llm.kind` "decoder" (or its alias "opt"): a decoder-only LLM; "t5": encoder-decoder."""
    return kind != "t5"


def model_config(preset: str = "tiny", **overrides) -> ModelConfig:
    """Build a validated ModelConfig from a preset and nested overrides (for code and tests)."""
    from blip2_ray.config import from_dict

    return from_dict(ModelConfig, {"preset": preset, **overrides})
