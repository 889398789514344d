"""The HF BLIP-2 formats: export and load of both stages (their HF configs: hf_configs.py).

- Stage 2 <-> `Blip2ForConditionalGeneration` directories (+ `Blip2Processor`), e.g. a local copy of
  Salesforce/blip2-opt-2.7b, with any decoder-only LLM as `text_config` (the LLM's own config).
- Stage 1 <-> `Blip2ForImageTextRetrieval` directories; the stage-1 extras HF has no place for (the
  Q-Former LM head and the temperature) go to `stage1_extras.safetensors` beside them.
Exports also record the ModelConfig (`blip2_ray_model.yaml`). A model with a CLIP ViT-L, which no HF BLIP-2
class holds, exports in our own format (native_format.py), read by the same loaders. ln_vision: HF's
post_layernorm uses the ViT's `layer_norm_eps`; an export whose `ln_vision_eps` differs (LAVIS imports: 1e-5)
records it as `vision_config.ln_vision_eps`, which our loaders honour and transformers ignores
(docs/checkpoints.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from blip2_ray.config import dump_yaml, from_dict, to_dict
from blip2_ray.errors import UserError
from blip2_ray.model.config import ModelConfig
from blip2_ray.model.language_model import DeviceMap
from blip2_ray.model.partitioned import full_shape
from blip2_ray.model.stage1 import Blip2Stage1
from blip2_ray.model.stage2 import Blip2Stage2
from blip2_ray.model.vision import DTYPES, as_dtype
from blip2_ray.weights.builders import build_stage1, stage2_from_blip2_dir
from blip2_ray.weights.hf_configs import _hf_from_state, quiet_save, stage1_hf_config, stage2_hf_class, stage2_hf_config
from blip2_ray.weights.local_files import require_local_dir
from blip2_ray.weights.native_format import (
    is_clip_vision,
    mirrored_hf_config,
    vision_fields,
    write_native_config,
)
from blip2_ray.weights.tokenizers import load_qformer_tokenizer
from blip2_ray.weights.weight_sources import CONFIG_FILE, EXTRAS_FILE, is_native_config, read_model_config


def image_processor(image_size: int):
    """The BlipImageProcessor an export saves: resize to `image_size` (bicubic), CLIP's normalisation (the data
    pipeline's: data/transforms.py)."""
    from transformers import BlipImageProcessor

    from blip2_ray.data.transforms import CLIP_NORMALIZATION

    return BlipImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=list(CLIP_NORMALIZATION["image_mean"]),
        image_std=list(CLIP_NORMALIZATION["image_std"]), do_convert_rgb=True, resample=3,
    )


# ---------------------------------------------------------------- stage 2 <-> Blip2ForConditionalGeneration
def stage2_processor(model: Blip2Stage2, tokenizer, qformer_tokenizer=None):
    """Blip2Processor, or InstructBlipProcessor (+ the Q-Former tokenizer) for a question-aware model."""
    from transformers import Blip2Processor, InstructBlipProcessor

    images = image_processor(model.vision_model.config.image_size)
    if not model.takes_question:
        return Blip2Processor(images, tokenizer, num_query_tokens=model.num_query_tokens)
    if qformer_tokenizer is None:
        raise ValueError("a question-aware (VQA) model's export needs its Q-Former tokenizer")
    return InstructBlipProcessor(images, tokenizer, qformer_tokenizer, num_query_tokens=model.num_query_tokens)


IMAGE_ROWS_MULTIPLE = 64  # transformers' BLIP-2 conversions: resize_token_embeddings(..., pad_to_multiple_of=64)


def image_token_index_of(model: Blip2Stage2, tokenizer) -> int:
    """The id of the <image> token HF's processor adds (the processor adds it to `tokenizer` first)."""
    return tokenizer.convert_tokens_to_ids("<image>")


def export_vocab_rows(model: Blip2Stage2, image_token_index: int) -> int | None:
    """The LLM vocabulary size of the export when the <image> token has no row in the model's (a Llama-2
    checkpoint, whose vocabulary is exactly its tokenizer's): the token's id + 1 rounded up to 64, as
    transformers' conversion resizes; None when the vocabulary already has the row (OPT, Qwen2, T5)."""
    rows = full_shape(model.llm_embeddings().weight)[0]
    if image_token_index < rows:
        return None
    return -(-(image_token_index + 1) // IMAGE_ROWS_MULTIPLE) * IMAGE_ROWS_MULTIPLE


def vocab_row_keys(model: Blip2Stage2) -> set[str]:
    """The state-dict keys of the LLM's input embedding and output head (each has a row per token)."""
    lm = model.language_model
    heads = [lm.get_input_embeddings().weight]
    if lm.get_output_embeddings() is not None:
        heads.append(lm.get_output_embeddings().weight)
    return {name for name, p in model.named_parameters(remove_duplicate=False) if any(p is h for h in heads)}


def grow_vocab_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """(V, D) -> (rows, D): the new rows (the <image> token's and the padding) start as the mean of the old ones
    (transformers' mean resizing, without its random spread); the <image> row's input is never read (the
    queries take its places) and its output row only has to be a row."""
    extra = tensor.float().mean(0, keepdim=True).to(tensor.dtype).expand(rows - tensor.shape[0], -1)
    return torch.cat([tensor, extra])


def export_stage2(model: Blip2Stage2, out_dir: str, tokenizer, model_cfg: ModelConfig | None = None,
                  qformer_tokenizer=None) -> str:
    """Write `out_dir` as `Blip2ForConditionalGeneration.save_pretrained` + `Blip2Processor` would (a VQA
    model with a question-aware Q-Former: InstructBlipForConditionalGeneration + InstructBlipProcessor; a CLIP
    ViT-L model: our own format, native_format.py)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    processor = stage2_processor(model, tokenizer, qformer_tokenizer)
    state = dict(model.state_dict())
    index = image_token_index_of(model, tokenizer)
    rows = export_vocab_rows(model, index)
    if rows is not None:
        state.update({k: grow_vocab_rows(state[k], rows) for k in vocab_row_keys(model)})
    cls, config = stage2_hf_class(model), stage2_hf_config(model, index, rows)
    hf = _hf_from_state(cls, config, state, model.vision_model)
    with quiet_save():
        hf.save_pretrained(str(out), safe_serialization=True)
    if is_clip_vision(model.vision_model):
        write_native_config(out, config, cls.__name__, model.vision_model)
    processor.save_pretrained(str(out))
    if model_cfg is not None:
        (out / CONFIG_FILE).write_text(dump_yaml(model_cfg))
    return str(out)


def load_stage2(path: str, *, vision_dtype: torch.dtype | str = torch.float16,
                llm_dtype: torch.dtype | str = torch.float16, device_map: DeviceMap | None = None,
                freeze: bool = True) -> Blip2Stage2:
    """A stage-2 model from a `Blip2ForConditionalGeneration` directory (ours or Salesforce's), built in
    the target dtypes directly (no float32 copy); `device_map` places the language model's submodules."""
    return stage2_from_blip2_dir(path, vision_dtype, llm_dtype, device_map=device_map, freeze=freeze)


# ---------------------------------------------------------------- stage 1 <-> Blip2ForImageTextRetrieval
def stage1_extras(model: Blip2Stage1) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith("lm_head.") or k == "temp"}


def export_stage1(model: Blip2Stage1, out_dir: str, tokenizer, model_cfg: ModelConfig | None = None) -> str:
    """Write a directory `Blip2ForImageTextRetrieval.from_pretrained` loads (+ our stage-1 extras; a CLIP
    ViT-L model: our own format, native_format.py)."""
    from safetensors.torch import save_file
    from transformers import Blip2ForImageTextRetrieval

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extras = stage1_extras(model)
    state = {k: v for k, v in model.state_dict().items() if k not in extras}
    config = stage1_hf_config(model)
    hf = _hf_from_state(Blip2ForImageTextRetrieval, config, state, model.vision_model)
    with quiet_save():
        hf.save_pretrained(str(out), safe_serialization=True)
    if is_clip_vision(model.vision_model):
        write_native_config(out, config, "Blip2ForImageTextRetrieval", model.vision_model)
    save_file({k: v.detach().contiguous().cpu() for k, v in extras.items()}, str(out / EXTRAS_FILE))
    tokenizer.save_pretrained(str(out))
    image_processor(model.vision_model.config.image_size).save_pretrained(str(out))
    if model_cfg is not None:
        (out / CONFIG_FILE).write_text(dump_yaml(model_cfg))
    return str(out)


def stage1_config_from_hf(path: str, hf_config, base: ModelConfig | None,
                          vision_kind: str = "eva_vit_g") -> ModelConfig:
    """The ModelConfig of a stage-1 directory: sizes from its HF config, the rest from `base` (recorded)."""
    v, q = hf_config.vision_config, hf_config.qformer_config
    data = to_dict(base) if base is not None else {"preset": "tiny"}
    recorded_eps = (data.get("vision") or {}).get("ln_vision_eps")
    data["vision"] = {**data.get("vision", {}), "kind": vision_kind, "hidden_size": v.hidden_size,
                      "intermediate_size": v.intermediate_size, "num_layers": v.num_hidden_layers,
                      "num_heads": v.num_attention_heads, "image_size": v.image_size, "patch_size": v.patch_size,
                      "layer_norm_eps": v.layer_norm_eps, "path": None,
                      "ln_vision_eps": getattr(v, "ln_vision_eps", recorded_eps)}
    data["qformer"] = {**data.get("qformer", {}), "hidden_size": q.hidden_size, "num_layers": q.num_hidden_layers,
                       "num_heads": q.num_attention_heads, "intermediate_size": q.intermediate_size,
                       "cross_attention_frequency": q.cross_attention_frequency,
                       "num_query_tokens": hf_config.num_query_tokens, "embed_dim": hf_config.image_text_hidden_size,
                       "vocab_size": q.vocab_size, "max_position_embeddings": q.max_position_embeddings,
                       "init_from_bert": None}
    data.update(init_from=path, hf_path=None)
    return from_dict(ModelConfig, data)


def load_stage1(path: str, vision_dtype: torch.dtype | str | None = None) -> tuple[Blip2Stage1, object]:
    """(model, Q-Former tokenizer) from a stage-1 export or a `Blip2ForImageTextRetrieval` directory.

    The ViT is read in `vision_dtype` (None: as recorded, else float16) directly; the trainable parts
    in float32. A directory without our extras file (Salesforce's) keeps the config's initial LM head
    and temperature.
    """
    from transformers import Blip2Config

    from blip2_ray.weights.local_files import read_json

    d = require_local_dir(path, "retrieval model")
    data = read_json(Path(d) / "config.json", "retrieval model config") if (Path(d) / "config.json").is_file() else {}
    if is_native_config(data):  # a CLIP ViT-L model in our own format
        _, hf_config = mirrored_hf_config(d, data)
        cfg = stage1_config_from_hf(d, hf_config, read_model_config(d), vision_kind=vision_fields(data)["kind"])
    else:
        try:
            hf_config = Blip2Config.from_pretrained(d, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"{path!r} holds no BLIP-2 config.json ({e.__class__.__name__})") from None
        cfg = stage1_config_from_hf(d, hf_config, read_model_config(d))
    if vision_dtype is not None:
        cfg.vision.dtype = next(k for k, v in DTYPES.items() if v == as_dtype(vision_dtype))
    tok = load_qformer_tokenizer(d)
    return build_stage1(cfg, tok), tok
