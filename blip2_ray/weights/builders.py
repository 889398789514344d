"""Building the stage models from a ModelConfig: frozen parts first (in their storage dtype, from their
weight sources), trainable parts next (float32), then the initialisations the config names.

Frozen parts: `build_vision_model` (vision.py) and `build_language_model` (language_model.py), each
allocated directly in its dtype. Trainable parts: queries, Q-Former, heads / projection, built by the
stage classes. Initialisation order: `qformer.init_from_bert`, then `init_from` (a stage-1 export or
a LAVIS .pth), each through its rename table (convert.py). Random parts are seeded by the caller.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch
from torch import nn

from blip2_ray.errors import UserError
from blip2_ray.model.config import ModelConfig
from blip2_ray.model.language_model import DeviceMap, padded_vocab, place_language_model
from blip2_ray.model.partitioned import FrozenConstruction, parameters_on_meta
from blip2_ray.model.qformer import build_qformer, init_query_tokens
from blip2_ray.model.stage1 import Blip2Stage1
from blip2_ray.model.stage2 import Blip2Stage2
from blip2_ray.model.vision import DTYPES, as_dtype
from blip2_ray.weights import convert
from blip2_ray.weights.checkpoint_files import assign_weights, require_materialized
from blip2_ray.weights.language_model import build_language_model, strict_from_pretrained
from blip2_ray.weights.local_files import read_json, require_local_dir
from blip2_ray.weights.tokenizer_paths import llm_tokenizer, qformer_tokenizer
from blip2_ray.weights.tokenizers import load_llm_tokenizer, prepends_bos
from blip2_ray.weights.vision import build_vision_model
from blip2_ray.weights.weight_sources import (
    INSTRUCTBLIP_MODEL_TYPE,
    WeightSource,
    bert_source,
    check_weight_sources,
    export_kind,
    init_from_source,
    is_native_config,
    read_model_config,
    vision_source,
)

ZERO3_HF_PATH = ("model.hf_path is read whole on every worker, so deepspeed.zero_stage 3 could not build it "
                 "partitioned; name its parts instead (model.vision.path and model.llm.path, with model.init_from "
                 "for the Q-Former) or use deepspeed.zero_stage 2")


def build_stage1(cfg: ModelConfig, tokenizer=None, construction: FrozenConstruction | None = None) -> Blip2Stage1:
    """A stage-1 model: frozen ViT from its source (or seeded random), Q-Former from BERT and/or init_from.

    `construction` (ZeRO-3, model/partitioned.py): the frozen ViT is built partitioned over the ranks.
    """
    check_weight_sources(cfg, stage=1)
    tok = tokenizer or qformer_tokenizer(cfg)
    vision = build_vision_model(cfg.vision, vision_source(cfg), construction)
    # trainable parts: when init_from supplies them all (a stage-1 checkpoint), on the meta device first
    # (no random init to throw away), else a seeded random init in float32
    whole = bool(cfg.init_from) and not cfg.qformer.init_from_bert
    with parameters_on_meta() if whole else contextlib.nullcontext():
        model = Blip2Stage1(cfg, cfg.qformer.vocab_size or len(tok), tok.bos_token_id, tok.pad_token_id,
                            vision_model=vision)
    if cfg.qformer.init_from_bert:
        init_qformer_from_bert(model, bert_source(cfg.qformer.init_from_bert))
    if cfg.init_from:
        source = init_from_source(cfg.init_from)
        load_init_from(model, source, stage=1)
        if whole:
            _init_stage1_extras_left_on_meta(model, cfg)
            require_materialized(model, source.label)
    return model


def _init_stage1_extras_left_on_meta(model: Blip2Stage1, cfg: ModelConfig) -> None:
    """A Blip2ForImageTextRetrieval directory has no ITG LM head or temperature: they start as a fresh model's."""
    head = model.lm_head
    if head.bias.device.type == "meta":
        head.to_empty(device="cpu")
        head.dense.reset_parameters()
        head.layer_norm.reset_parameters()
        nn.init.zeros_(head.bias)
    if model.temp.device.type == "meta":
        model.temp = nn.Parameter(torch.tensor(cfg.qformer.temp_init))


def build_stage2(cfg: ModelConfig, tokenizer=None, construction: FrozenConstruction | None = None) -> Blip2Stage2:
    """A stage-2 model: `hf_path` (a whole Blip2ForConditionalGeneration dir), else frozen ViT + LLM from
    their sources and the trainable queries, Q-Former and projection (from `init_from` when given).

    `construction` (ZeRO-3, model/partitioned.py): the frozen ViT and LLM are built partitioned over the
    ranks (not with `hf_path`: that directory is read whole by transformers, a UserError names the fix).
    """
    check_weight_sources(cfg, stage=2)
    vision_dtype, llm_dtype = DTYPES[cfg.vision.dtype], DTYPES[cfg.llm.dtype]
    if cfg.hf_path and construction is not None:
        raise UserError(ZERO3_HF_PATH)
    if cfg.hf_path:
        model = stage2_from_blip2_dir(cfg.hf_path, vision_dtype, llm_dtype)
        tok = (tokenizer or llm_tokenizer(cfg)) if cfg.llm.prompt else None
    else:
        tok = tokenizer or llm_tokenizer(cfg)
        q = cfg.qformer
        # frozen parts, each allocated in its storage dtype
        vision = build_vision_model(cfg.vision, vision_source(cfg), construction)
        language_model = build_language_model(cfg, cfg.llm.vocab_size or padded_vocab(len(tok)), construction)
        # trainable parts, float32
        qformer = build_qformer(q, cfg.vision.hidden_size, vocab_size=q.vocab_size or 1, with_text=False)
        query_tokens = init_query_tokens(q.num_query_tokens, q.hidden_size, q.initializer_range)
        projection = nn.Linear(q.hidden_size, language_model.get_input_embeddings().embedding_dim)
        model = Blip2Stage2(vision, query_tokens, qformer, projection, language_model, cfg.llm.kind,
                            vision_dtype=vision_dtype, llm_dtype=llm_dtype, starts_with_bos=prepends_bos(tok))
        if cfg.init_from:
            load_init_from(model, init_from_source(cfg.init_from), stage=2)
    if cfg.llm.prompt:
        model.prompt_ids = torch.tensor([tok(cfg.llm.prompt, add_special_tokens=False).input_ids])
    return model


def init_qformer_from_bert(model: Blip2Stage1, source: WeightSource) -> None:
    """Self-attention, text FFN, embeddings and the MLM head from BERT; each query FFN starts as a copy of
    its layer's text FFN; cross-attention stays random; the `[DEC]` row keeps its init (table: convert.BERT)."""
    files = source.files()
    plan = convert.plan_conversion(convert.BERT, files.keys(), source.label)
    own = model.state_dict(keep_vars=True)
    required = [k for k in own if re.search(convert.BERT.provides, k)]
    assign_weights(model, convert.convert_tensors(plan, files, own), source.label, required=required)


_VIT_TRUNK_SOURCE_KEYS = r"^(vision_model\.(embeddings|encoder|clip)\.|visual_encoder\.)"


def load_init_from(model: nn.Module, source: WeightSource, stage: int) -> None:
    """Assign what `source` (stage-1 export or LAVIS .pth) holds for `model`, except the ViT trunk (read
    when the ViT was built from it). Stage 2 drops, by name, the stage-1 parts it has no use for."""
    files = source.files()
    keys = [k for k in files.keys() if not re.match(_VIT_TRUNK_SOURCE_KEYS, k)]
    unused = convert.STAGE2_UNUSED if stage == 2 else ()
    plan = convert.plan_conversion(source.layout, keys, source.label, unused=unused)
    own = model.state_dict(keep_vars=True)
    # a Blip2ForImageTextRetrieval directory without our extras file has no ITG head or temperature
    optional = r"^(lm_head\.|temp$)" if source.layout is convert.STAGE1_EXPORT and not source.extra_files else r"^$"
    required = [k for k in own if re.search(source.layout.provides, k) and not re.search(optional, k)
                and not k.startswith(("vision_model.embeddings.", "vision_model.encoder."))]
    assign_weights(model, convert.convert_tensors(plan, files, own), source.label, required=required)


def stage2_from_blip2_dir(path: str, vision_dtype: torch.dtype | str = torch.float16,
                          llm_dtype: torch.dtype | str = torch.float16, device_map: DeviceMap | None = None,
                          freeze: bool = True) -> Blip2Stage2:
    """A stage-2 model from a `Blip2ForConditionalGeneration` directory (ours or Salesforce's).

    Read by transformers directly in `llm_dtype` (the Q-Former and queries stay float32, as HF keeps
    them); the ViT is cast to `vision_dtype` only if that differs. `device_map` places the language
    model's submodules ({"": "cuda:0"}, {"model.decoder.layers.0": 0, ...}; see place_language_model).
    """
    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    vision_dtype, llm_dtype = as_dtype(vision_dtype), as_dtype(llm_dtype)
    d = require_local_dir(path, "model")
    data = read_json(Path(d) / "config.json", "model config") if (Path(d) / "config.json").is_file() else {}
    if not is_stage2_dir_config(data):
        raise UserError(f"{path!r} is not a Blip2ForConditionalGeneration directory (a stage-2 export or a "
                        f"Salesforce blip2-opt / blip2-flan-t5 copy) or the InstructBlipForConditionalGeneration "
                        f"directory of a VQA fine-tune")
    base = InstructBlipForConditionalGeneration if data["model_type"] == INSTRUCTBLIP_MODEL_TYPE \
        else Blip2ForConditionalGeneration

    class WithFloat32Trainables(base):
        # the trainable parts read in float32 at full precision: transformers' own list keeps the Q-Former
        # in float32 for float16 only, and a bfloat16 round trip would lose the trained weights' low bits
        _keep_in_fp32_modules_strict = ["query_tokens", "qformer", "language_projection", "vision_model.post_layernorm"]

    if is_native_config(data):
        from blip2_ray.weights.native_format import load_native_hf

        hf = load_native_hf(d, data, vision_dtype, llm_dtype)
    else:
        hf = strict_from_pretrained(WithFloat32Trainables, d, "model", dtype=llm_dtype)
    recorded = read_model_config(d)
    eps = getattr(hf.config.vision_config, "ln_vision_eps", None)
    if recorded is not None and recorded.vision.ln_vision_eps is not None:
        eps = recorded.vision.ln_vision_eps
    if eps is not None:
        hf.vision_model.post_layernorm.eps = eps
    decoder = bool(hf.config.use_decoder_only_language_model)
    language_model = hf.language_model
    if device_map:
        place_language_model(language_model, device_map)
    return Blip2Stage2(
        hf.vision_model, hf.query_tokens, hf.qformer, hf.language_projection, language_model,
        "decoder" if decoder else "t5", vision_dtype=vision_dtype, llm_dtype=llm_dtype,
        starts_with_bos=decoder and _starts_with_bos(d, hf.config.text_config.model_type), freeze=freeze,
    )


def is_stage2_dir_config(data: dict) -> bool:
    """Whether a config.json describes a whole stage-2 model: Blip2ForConditionalGeneration, or the
    InstructBlipForConditionalGeneration layout of a VQA fine-tune (question-aware Q-Former), in HF's
    format or ours (a CLIP ViT-L model, weights/native_format.py)."""
    return export_kind(data) in ("stage2", "vqa")


def _starts_with_bos(model_dir: str, family: str) -> bool:
    if (Path(model_dir) / "tokenizer_config.json").is_file():
        return prepends_bos(load_llm_tokenizer(model_dir))
    if family == "opt":
        return True
    raise UserError(f"{model_dir!r} holds no tokenizer, so whether its {family} LLM expects a BOS is unknown; "
                    f"save the LLM's tokenizer into the directory")
