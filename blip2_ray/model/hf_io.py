"""Building models from a ModelConfig, and moving weights to and from the HF ecosystem and LAVIS.

- Stage 2 <-> `Blip2ForConditionalGeneration` directories (+ `Blip2Processor`), e.g. a local copy of
  Salesforce/blip2-opt-2.7b: our modules *are* HF's modules, so loading takes them over and export
  writes them with `save_pretrained` (safetensors).
- Stage 1 <-> `Blip2ForImageTextRetrieval` directories; the stage-1 extras HF has no place for (the
  Q-Former LM head and the temperature) go to `stage1_extras.safetensors` beside them.
- LAVIS `.pth` state dicts -> our (= HF's) key names, with the renames of HF's conversion script.
- A BERT checkpoint directory -> the Q-Former (the query FFN copied from the text FFN).
Everything loads from local directories only; a hub id is one clear error.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from blip2_ray.config import dump_yaml, from_dict, to_dict
from blip2_ray.errors import UserError
from blip2_ray.model.config import ModelConfig
from blip2_ray.model.qformer import build_qformer, init_query_tokens
from blip2_ray.model.stage1 import Blip2Stage1
from blip2_ray.model.stage2 import Blip2Stage2
from blip2_ray.model.tokenizers import (
    build_tiny_tokenizers,
    default_tiny_tokenizer_dir,
    load_qformer_tokenizer,
    load_tokenizer,
)
from blip2_ray.model.vision import DTYPES, build_vision_model

EXTRAS_FILE = "stage1_extras.safetensors"
CONFIG_FILE = "blip2_ray_model.yaml"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def require_local_dir(path: str, what: str) -> str:
    p = Path(path)
    if not p.is_dir():
        raise UserError(
            f"{what} {path!r} is not a local directory (no network: download it once, e.g. with "
            f"`huggingface-cli download <id> --local-dir DIR`, and pass DIR)"
        )
    return str(p)


# ---------------------------------------------------------------- tokenizers of a config
def tokenizer_path(value: str, kind: str) -> str:
    """'tiny' -> the offline-built tiny tokenizer of `kind` ("qformer", "opt", "t5"); else a local dir."""
    if value == "tiny":
        return build_tiny_tokenizers(default_tiny_tokenizer_dir())[kind]
    return require_local_dir(value, f"{kind} tokenizer")


def qformer_tokenizer(cfg: ModelConfig):
    return load_qformer_tokenizer(tokenizer_path(cfg.qformer.tokenizer, "qformer"))


def llm_tokenizer(cfg: ModelConfig):
    path = cfg.llm.path if cfg.llm.tokenizer == "tiny" and cfg.llm.path else None
    return load_tokenizer(path or tokenizer_path(cfg.llm.tokenizer, cfg.llm.kind), "LLM tokenizer")


def padded_vocab(n: int) -> int:
    """Room for `<image>` (added by Blip2Processor) rounded up to a multiple of 8, as real checkpoints have."""
    return (n + 1 + 7) // 8 * 8


# ---------------------------------------------------------------- builders
def build_stage1(cfg: ModelConfig, tokenizer=None) -> Blip2Stage1:
    """A stage-1 model from the config (random init; `qformer.init_from_bert` and `vision.path` honoured)."""
    tok = tokenizer or qformer_tokenizer(cfg)
    vocab = cfg.qformer.vocab_size or len(tok)
    model = Blip2Stage1(cfg, vocab, tok.bos_token_id, tok.pad_token_id)
    if cfg.qformer.init_from_bert:
        init_qformer_from_bert(model, cfg.qformer.init_from_bert)
    return model


def build_language_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, OPTConfig, OPTForCausalLM, T5Config
    from transformers import T5ForConditionalGeneration

    llm = cfg.llm
    if llm.path:
        cls = AutoModelForCausalLM if llm.kind == "opt" else AutoModelForSeq2SeqLM
        return cls.from_pretrained(require_local_dir(llm.path, "LLM"), dtype=DTYPES[llm.dtype], local_files_only=True)
    if llm.kind == "opt":
        return OPTForCausalLM(
            OPTConfig(
                vocab_size=vocab_size, hidden_size=llm.hidden_size, num_hidden_layers=llm.num_layers,
                num_attention_heads=llm.num_heads, ffn_dim=llm.ffn_size, max_position_embeddings=llm.max_positions,
                word_embed_proj_dim=llm.hidden_size, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                dropout=0.1, attention_dropout=0.0,
            )
        )
    return T5ForConditionalGeneration(
        T5Config(
            vocab_size=vocab_size, d_model=llm.hidden_size, d_kv=llm.head_dim, d_ff=llm.ffn_size,
            num_layers=llm.num_layers, num_decoder_layers=llm.num_layers, num_heads=llm.num_heads,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def build_stage2(cfg: ModelConfig, tokenizer=None) -> Blip2Stage2:
    """A stage-2 model from the config: `hf_path` (a whole HF model), else parts (+ `init_from` stage 1)."""
    if cfg.hf_path:
        return load_stage2(cfg.hf_path, vision_dtype=DTYPES[cfg.vision.dtype], llm_dtype=DTYPES[cfg.llm.dtype])
    tok = tokenizer or llm_tokenizer(cfg)
    vocab = cfg.llm.vocab_size or padded_vocab(len(tok))
    q = cfg.qformer
    vision = build_vision_model(cfg.vision)
    qformer = build_qformer(q, cfg.vision.hidden_size, vocab_size=q.vocab_size or 1, with_text=False)
    query_tokens = init_query_tokens(q.num_query_tokens, q.hidden_size)
    language_model = build_language_model(cfg, vocab)
    projection = nn.Linear(q.hidden_size, language_model.config.hidden_size if cfg.llm.kind == "opt" else language_model.config.d_model)
    prompt_ids = None
    if cfg.llm.prompt:
        prompt_ids = torch.tensor([tok(cfg.llm.prompt, add_special_tokens=False).input_ids])
    model = Blip2Stage2(
        vision, query_tokens, qformer, projection, language_model, cfg.llm.kind,
        vision_dtype=DTYPES[cfg.vision.dtype], llm_dtype=DTYPES[cfg.llm.dtype], prompt_ids=prompt_ids,
    )
    if cfg.init_from:
        init_stage2_from_stage1(model, cfg.init_from)
    return model


# ---------------------------------------------------------------- HF configs
def _vision_hf_config(model: nn.Module):
    from transformers import Blip2VisionModel

    if not isinstance(model.vision_model, Blip2VisionModel):
        raise UserError("only the EVA ViT-g (Blip2VisionModel) image encoder exports to the HF BLIP-2 format")
    return model.vision_model.config


def stage2_hf_config(model: Blip2Stage2, image_token_index: int):
    from transformers import Blip2Config

    qcfg = model.qformer.config.to_dict()
    return Blip2Config(
        vision_config=_vision_hf_config(model).to_dict(),
        qformer_config=qcfg,
        text_config=model.language_model.config.to_dict(),
        num_query_tokens=model.num_query_tokens,
        image_token_index=image_token_index,
    )


def stage1_hf_config(model: Blip2Stage1):
    from transformers import Blip2Config, OPTConfig

    return Blip2Config(
        vision_config=_vision_hf_config(model).to_dict(),
        qformer_config=model.qformer.config.to_dict(),
        text_config=OPTConfig().to_dict(),  # unused by the retrieval model; HF's config requires one
        num_query_tokens=model.query_tokens.shape[1],
        image_text_hidden_size=model.vision_projection.out_features,
        image_token_index=None,
    )


def image_processor(image_size: int):
    from transformers import BlipImageProcessor

    return BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        do_convert_rgb=True, resample=3,
    )


def _hf_from_state(cls, config, state: dict[str, torch.Tensor]):
    """An HF model holding `state` without allocating a second copy (meta init + assign)."""
    with torch.device("meta"):
        hf = cls(config)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _is_tied(hf, k)]
    if missing or unexpected:
        raise RuntimeError(f"state does not match {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.tie_weights()
    return hf


def _is_tied(hf, key: str) -> bool:
    return key.endswith("lm_head.weight") or key.endswith("embed_tokens.weight")


# ---------------------------------------------------------------- stage 2 <-> Blip2ForConditionalGeneration
def export_stage2(model: Blip2Stage2, out_dir: str, tokenizer, model_cfg: ModelConfig | None = None) -> str:
    """Write `out_dir` as `Blip2ForConditionalGeneration.save_pretrained` + `Blip2Processor` would."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    image_size = _vision_hf_config(model).image_size
    processor = Blip2Processor(image_processor(image_size), tokenizer, num_query_tokens=model.num_query_tokens)
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_index >= model.llm_embeddings().num_embeddings:
        raise UserError("the LLM vocabulary has no room for the <image> token HF's processor adds")
    state = {k: v for k, v in model.state_dict().items()}
    hf = _hf_from_state(Blip2ForConditionalGeneration, stage2_hf_config(model, image_token_index), state)
    hf.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    if model_cfg is not None:
        (out / CONFIG_FILE).write_text(dump_yaml(model_cfg))
    return str(out)


def load_stage2(path: str, *, vision_dtype=torch.float16, llm_dtype=torch.float16, freeze: bool = True) -> Blip2Stage2:
    """A stage-2 model from a `Blip2ForConditionalGeneration` directory (ours or Salesforce's)."""
    from transformers import Blip2ForConditionalGeneration

    d = require_local_dir(path, "model")
    try:
        hf = Blip2ForConditionalGeneration.from_pretrained(d, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"{path!r} is not a Blip2ForConditionalGeneration directory ({e.__class__.__name__}: {str(e)[:200]})") from None
    kind = "opt" if hf.config.use_decoder_only_language_model else "t5"
    return Blip2Stage2(
        hf.vision_model, hf.query_tokens, hf.qformer, hf.language_projection, hf.language_model, kind,
        vision_dtype=vision_dtype, llm_dtype=llm_dtype, freeze=freeze,
    )


# ---------------------------------------------------------------- stage 1 <-> Blip2ForImageTextRetrieval
def stage1_extras(model: Blip2Stage1) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("lm_head.") or k == "temp"}


def export_stage1(model: Blip2Stage1, out_dir: str, tokenizer, model_cfg: ModelConfig | None = None) -> str:
    """Write a directory `Blip2ForImageTextRetrieval.from_pretrained` loads (+ our stage-1 extras)."""
    from safetensors.torch import save_file
    from transformers import Blip2ForImageTextRetrieval

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extras = stage1_extras(model)
    state = {k: v for k, v in model.state_dict().items() if k not in extras}
    hf = _hf_from_state(Blip2ForImageTextRetrieval, stage1_hf_config(model), state)
    hf.save_pretrained(str(out), safe_serialization=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in extras.items()}, str(out / EXTRAS_FILE))
    tokenizer.save_pretrained(str(out))
    image_processor(_vision_hf_config(model).image_size).save_pretrained(str(out))
    if model_cfg is not None:
        (out / CONFIG_FILE).write_text(dump_yaml(model_cfg))
    return str(out)


def _stage1_cfg_from_hf(hf_config, base: ModelConfig | None) -> ModelConfig:
    v, q = hf_config.vision_config, hf_config.qformer_config
    data = to_dict(base) if base is not None else {"preset": "tiny"}
    data["vision"] = {**data.get("vision", {}), "kind": "eva_vit_g", "hidden_size": v.hidden_size,
                      "intermediate_size": v.intermediate_size, "num_layers": v.num_hidden_layers,
                      "num_heads": v.num_attention_heads, "image_size": v.image_size, "patch_size": v.patch_size,
                      "layer_norm_eps": v.layer_norm_eps, "path": None}
    data["qformer"] = {**data.get("qformer", {}), "hidden_size": q.hidden_size, "num_layers": q.num_hidden_layers,
                       "num_heads": q.num_attention_heads, "intermediate_size": q.intermediate_size,
                       "cross_attention_frequency": q.cross_attention_frequency,
                       "num_query_tokens": hf_config.num_query_tokens, "embed_dim": hf_config.image_text_hidden_size,
                       "vocab_size": q.vocab_size, "max_position_embeddings": q.max_position_embeddings,
                       "init_from_bert": None}
    return from_dict(ModelConfig, data)


def read_model_config(path: str) -> ModelConfig | None:
    f = Path(path) / CONFIG_FILE
    if not f.exists():
        return None
    import yaml

    return from_dict(ModelConfig, yaml.safe_load(f.read_text()))


def load_stage1(path: str, vision_dtype: str | None = None) -> tuple[Blip2Stage1, object]:
    """(model, Q-Former tokenizer) from a stage-1 export or a `Blip2ForImageTextRetrieval` directory."""
    from safetensors.torch import load_file
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    d = require_local_dir(path, "retrieval model")
    try:
        hf_config = Blip2Config.from_pretrained(d, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"{path!r} holds no BLIP-2 config.json ({e.__class__.__name__})") from None
    hf_config.qformer_config.use_qformer_text_input = True
    cfg = _stage1_cfg_from_hf(hf_config, read_model_config(d))
    if vision_dtype:
        cfg.vision.dtype = vision_dtype
    tok = load_qformer_tokenizer(d)
    hf = Blip2ForImageTextRetrieval.from_pretrained(d, config=hf_config, local_files_only=True, dtype=torch.float32)
    model = Blip2Stage1(cfg, hf_config.qformer_config.vocab_size, tok.bos_token_id, tok.pad_token_id)
    state = hf.state_dict()
    extras_path = Path(d) / EXTRAS_FILE
    if extras_path.exists():
        state.update(load_file(str(extras_path)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.startswith("lm_head.") or k == "temp")]
    if missing or unexpected:
        raise UserError(f"{path!r} does not match the stage-1 model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    from blip2_ray.model.vision import freeze_vision

    freeze_vision(model.vision_model, DTYPES[cfg.vision.dtype])
    return model, tok


def init_stage2_from_stage1(model: Blip2Stage2, path: str) -> None:
    """Copy ln_vision, the queries and the Q-Former's query path from a stage-1 export into `model`."""
    stage1, _ = load_stage1(path)
    state = {k: v for k, v in stage1.state_dict().items() if k == "query_tokens" or k.startswith("qformer.")
             or k.startswith("vision_model.post_layernorm.")}
    if not model.vision_model.config.hidden_size == stage1.vision_model.config.hidden_size:
        raise UserError(f"stage-1 export {path!r} was trained on a different image encoder")
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own}  # the text FFNs are not used in stage 2
    missing = [k for k in own if (k.startswith("qformer.") or k == "query_tokens") and k not in state]
    if missing:
        raise UserError(f"stage-1 export {path!r} lacks Q-Former weights such as {missing[0]}")
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------- LAVIS and BERT checkpoints
_LAVIS_RULES = [
    (r"^visual_encoder\.cls_token$", "vision_model.embeddings.class_embedding"),
    (r"^visual_encoder\.pos_embed$", "vision_model.embeddings.position_embedding"),
    (r"^visual_encoder\.patch_embed\.proj\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual_encoder\.blocks\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.qkv\.weight$", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (r"^visual_encoder\.blocks\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.projection."),
    (r"^visual_encoder\.blocks\.(\d+)\.mlp\.", r"vision_model.encoder.layers.\1.mlp."),
    (r"^ln_vision\.", "vision_model.post_layernorm."),
    (r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"^Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings)\.", r"embeddings.\1."),
    (r"^Qformer\.bert\.encoder\.", "qformer.encoder."),
    (r"^Qformer\.cls\.predictions\.transform\.dense\.", "lm_head.dense."),
    (r"^Qformer\.cls\.predictions\.transform\.LayerNorm\.", "lm_head.layer_norm."),
    (r"^Qformer\.cls\.predictions\.bias$", "lm_head.bias"),
    (r"^(opt_proj|t5_proj)\.", "language_projection."),
    (r"^(opt_model|t5_model)\.", "language_model."),
    (r"^vision_proj\.", "vision_projection."),
    (r"^text_proj\.", "text_projection."),
]
_LAVIS_DROP = re.compile(
    r"(position_ids$|^Qformer\.cls\.predictions\.decoder\.|attn\.(q|v)_bias$|^visual_encoder\.norm\.|^visual_encoder\.head)"
)


def convert_lavis_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS BLIP-2 keys -> ours (= HF's + `lm_head.*`, `temp`); qkv bias = cat(q_bias, 0, v_bias)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = re.match(r"^visual_encoder\.blocks\.(\d+)\.attn\.q_bias$", key)
        if m:
            v_bias = state[f"visual_encoder.blocks.{m.group(1)}.attn.v_bias"]
            out[f"vision_model.encoder.layers.{m.group(1)}.self_attn.qkv.bias"] = torch.cat(
                [value, torch.zeros_like(v_bias), v_bias]
            )
            continue
        if _LAVIS_DROP.search(key):
            continue
        new = key
        for pat, rep in _LAVIS_RULES:
            new, n = re.subn(pat, rep, new)
            if n:
                break
        new = new.replace(".attention.self.", ".attention.attention.").replace(
            ".crossattention.self.", ".crossattention.attention."
        )
        out[new] = value
    return out


def load_lavis_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Read a LAVIS `.pth` (weights only: no code runs) and convert its keys."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"LAVIS checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # pickled non-tensor objects are refused by weights_only
        raise UserError(f"{path!r} is not a plain tensor checkpoint that loads with weights_only ({e.__class__.__name__})") from None
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path!r} holds no state dict")
    return convert_lavis_state_dict(state)


def init_qformer_from_bert(model: Blip2Stage1, bert_dir: str) -> None:
    """Initialise the Q-Former from a BERT checkpoint directory (bert-base-uncased layout).

    Self-attention, text FFN, embeddings and the MLM head come from BERT; each query FFN starts as a
    copy of its layer's text FFN; cross-attention stays randomly initialised. The `[DEC]` row of the
    word embeddings (BERT has one row fewer) keeps its random init.
    """
    from safetensors.torch import load_file

    d = Path(require_local_dir(bert_dir, "BERT checkpoint"))
    if (d / "model.safetensors").exists():
        bert = load_file(str(d / "model.safetensors"))
    elif (d / "pytorch_model.bin").exists():
        bert = torch.load(str(d / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise UserError(f"BERT directory {bert_dir!r} has no model.safetensors or pytorch_model.bin")
    bert = {re.sub(r"^bert\.", "", k): v for k, v in bert.items()}
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    for k, v in bert.items():
        if k.startswith("embeddings.LayerNorm."):
            new["qformer.layernorm." + k.split(".")[-1]] = v
        elif k.startswith("embeddings.word_embeddings."):
            w = own["embeddings.word_embeddings.weight"].clone()
            n = min(w.shape[0], v.shape[0])
            w[:n] = v[:n]
            new["embeddings.word_embeddings.weight"] = w
        elif k.startswith("embeddings.position_embeddings."):
            n = own["embeddings.position_embeddings.weight"].shape[0]
            new["embeddings.position_embeddings.weight"] = v[:n]
        elif k.startswith("encoder.layer."):
            k2 = "qformer." + k.replace(".attention.self.", ".attention.attention.")
            new[k2] = v
            m = re.match(r"qformer\.encoder\.layer\.(\d+)\.(intermediate|output)\.(.*)$", k2)
            if m:  # the FFN (not attention.output): the query FFN starts as its copy
                new[f"qformer.encoder.layer.{m.group(1)}.{m.group(2)}_query.{m.group(3)}"] = v
        elif k.startswith("cls.predictions.transform.dense."):
            new["lm_head.dense." + k.split(".")[-1]] = v
        elif k.startswith("cls.predictions.transform.LayerNorm."):
            new["lm_head.layer_norm." + k.split(".")[-1]] = v
        elif k == "cls.predictions.bias":
            b = own["lm_head.bias"].clone()
            n = min(b.shape[0], v.shape[0])
            b[:n] = v[:n]
            new["lm_head.bias"] = b
    bad = [k for k, v in new.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise UserError(f"BERT checkpoint {bert_dir!r} does not fit the Q-Former config (e.g. {bad[0]})")
    model.load_state_dict(new, strict=False)
