"""Where each part's weights come from, decided from the config's path fields and the files' content.

- `model.vision.path`: a BLIP-2 directory (its `vision_model.*`), a ViT-only HF directory
  (Blip2VisionModel), a CLIP directory (CLIPVisionModel / CLIPModel) or LAVIS's `eva_vit_g.pth`;
  the layout is read from `config.json`'s model_type or from the file's keys.
- `model.init_from`: a stage-1 export / Blip2ForImageTextRetrieval directory, or a LAVIS `.pth`.
  When it holds the ViT (exports always do), that ViT is the frozen encoder: a different
  `model.vision.path` is an error.
- `model.qformer.init_from_bert`: a BERT directory (bert-base-uncased as published).
- `model.llm.path`: any AutoModelForCausalLM directory (`kind: decoder`) or a T5 directory.
Everything here is cheap (config files, headers, memory maps), so the training job runs
`check_weight_sources` before any worker starts: a wrong kind, a wrong size or a frozen part with no
weights (outside the tiny presets, without `model.allow_random_init`) is one sentence naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from blip2_ray.errors import UserError
from blip2_ray.model.config import ModelConfig, QFormerConfig, VisionConfig, ln_vision_eps
from blip2_ray.weights import convert
from blip2_ray.weights.checkpoint_files import TensorFiles
from blip2_ray.weights.export_kinds import (  # noqa: F401 - re-exported: the loaders' names for the kinds
    BLIP2_MODEL_TYPES,
    INSTRUCTBLIP_MODEL_TYPE,
    NATIVE_MODEL_TYPE,
    export_kind,
    is_native_config,
)
from blip2_ray.weights.llm_source import llm_config_at
from blip2_ray.weights.local_files import read_json, require_local_dir, require_local_path

CONFIG_FILE = "blip2_ray_model.yaml"  # the ModelConfig an export was trained with
EXTRAS_FILE = "stage1_extras.safetensors"  # stage-1 weights HF has no place for (Q-Former LM head, temp)
_VISION_EXPECTED = ("a BLIP-2 directory, a Blip2VisionModel directory, a CLIP directory (CLIPVisionModel / "
                    "CLIPModel) or LAVIS's eva_vit_g.pth")


@dataclass
class WeightSource:
    """A weight file or directory, the layout its keys follow, and the config key that named it."""

    path: str
    layout: convert.Layout
    key: str  # e.g. "model.vision.path"
    config: dict | None = None  # the part of config.json describing these weights (None for .pth files)
    extra_files: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.key} {self.path!r}"

    def files(self) -> TensorFiles:
        return TensorFiles(self.path, extra=self.extra_files)


def read_model_config(path: str) -> ModelConfig | None:
    """The ModelConfig recorded in an export directory (None when the directory has none)."""
    from blip2_ray.config import from_dict

    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        return None
    import yaml

    return from_dict(ModelConfig, yaml.safe_load(f.read_text()))


def _config_json(path: str, key: str) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise UserError(f"{key} {path!r} holds no config.json; expected {_VISION_EXPECTED}")
    return read_json(f, f"{key} config")


def vision_source_at(path: str, cfg: VisionConfig, key: str = "model.vision.path") -> WeightSource:
    """Detect the layout of a ViT source and check it against `cfg` (kind and sizes)."""
    require_local_path(path, key)
    if Path(path).is_dir():
        data = _config_json(path, key)
        model_type = data.get("model_type")
        layouts = {**dict.fromkeys(BLIP2_MODEL_TYPES, (convert.BLIP2_DIR_VIT, "vision_config")),
                   "blip_2_vision_model": (convert.HF_VIT, None),
                   "clip_vision_model": (convert.CLIP_VIT, None), "clip": (convert.CLIP_VIT, "vision_config"),
                   NATIVE_MODEL_TYPE: (convert.NATIVE_CLIP_VIT, "vision_config")}
        if model_type not in layouts:
            raise UserError(f"{key} {path!r} holds a {model_type!r} model; expected {_VISION_EXPECTED}")
        layout, section = layouts[model_type]
        source = WeightSource(path, layout, key, data.get(section, {}) if section else data)
        _check_vision_config(source, cfg)
        return source
    keys = TensorFiles(path).keys()
    if any(k.startswith("blocks.") and k.endswith(".attn.qkv.weight") for k in keys):
        source = WeightSource(path, convert.EVA_VIT, key)
        _check_eva_file(source, cfg)
        return source
    if any(k.startswith("Qformer.") for k in keys):
        raise UserError(f"{key} {path!r} is a LAVIS BLIP-2 checkpoint: name it as model.init_from "
                        f"(with LAVIS's eva_vit_g.pth as {key} when it holds no visual_encoder)")
    raise UserError(f"{key} {path!r} is not a ViT checkpoint this project knows; expected {_VISION_EXPECTED}")


def _mismatch(source: WeightSource, what: str, found, expected, field: str) -> UserError:
    return UserError(f"{source.label} holds a ViT with {what} {found}, the config expects {expected}: "
                     f"set model.vision.{field} (or the preset) to match, or point {source.key} at the right weights")


def _check_vision_config(source: WeightSource, cfg: VisionConfig) -> None:
    is_clip = source.layout in convert.CLIP_LAYOUTS
    if is_clip != (cfg.kind == "clip_vit_l"):
        raise UserError(f"{source.label} holds a {'CLIP' if is_clip else 'EVA'} ViT but model.vision.kind is "
                        f"{cfg.kind!r}; set model.vision.kind to {'clip_vit_l' if is_clip else 'eva_vit_g'}")
    c = source.config or {}
    for field, name in (("hidden_size", "hidden_size"), ("intermediate_size", "intermediate_size"),
                        ("num_heads", "num_attention_heads"), ("patch_size", "patch_size"),
                        ("layer_norm_eps", "layer_norm_eps")):
        if name in c and c[name] != getattr(cfg, field):
            raise _mismatch(source, name, c[name], getattr(cfg, field), field)
    if c.get("num_hidden_layers", cfg.num_layers) < cfg.num_layers:
        raise _mismatch(source, "num_hidden_layers", c["num_hidden_layers"], f">= {cfg.num_layers}", "num_layers")


def _check_eva_file(source: WeightSource, cfg: VisionConfig) -> None:
    if cfg.kind != "eva_vit_g":
        raise UserError(f"{source.label} holds an EVA ViT but model.vision.kind is {cfg.kind!r}; set it to eva_vit_g")
    files = TensorFiles(source.path)
    width, _, patch, _ = files.shape("patch_embed.proj.weight")
    if width != cfg.hidden_size:
        raise _mismatch(source, "width", width, cfg.hidden_size, "hidden_size")
    if patch != cfg.patch_size:
        raise _mismatch(source, "patch size", patch, cfg.patch_size, "patch_size")
    mlp = files.shape("blocks.0.mlp.fc1.weight")[0]
    if mlp != cfg.intermediate_size:
        raise _mismatch(source, "MLP width", mlp, cfg.intermediate_size, "intermediate_size")
    depth = len({k.split(".")[1] for k in files.keys() if k.startswith("blocks.")})
    if depth < cfg.num_layers:
        raise _mismatch(source, "blocks", depth, f">= {cfg.num_layers}", "num_layers")


# ------------------------------------------------------------------------------------ model.init_from
def init_from_source(path: str, key: str = "model.init_from") -> WeightSource:
    """A stage-1 export (or Blip2ForImageTextRetrieval directory), or a LAVIS BLIP-2 `.pth`."""
    require_local_path(path, key)
    if Path(path).is_dir():
        data = read_json(Path(path) / "config.json", f"{key} config") if (Path(path) / "config.json").is_file() else {}
        if data.get("model_type") not in (*BLIP2_MODEL_TYPES, NATIVE_MODEL_TYPE):
            raise UserError(f"{key} {path!r} is not a stage-1 export (its config.json has no BLIP-2 model); "
                            f"point it at the output_dir of a stage-1 run or a LAVIS .pth")
        if "Blip2ForConditionalGeneration" in data.get("architectures", []) or export_kind(data) != "stage1" and \
                is_native_config(data):
            raise UserError(f"{key} {path!r} is a stage-2 (Blip2ForConditionalGeneration) directory; "
                            f"load a whole stage-2 model with model.hf_path instead")
        extras = os.path.join(path, EXTRAS_FILE)
        return WeightSource(path, convert.STAGE1_EXPORT, key, data, (extras,) if os.path.isfile(extras) else ())
    keys = TensorFiles(path).keys()
    if not any(k.startswith("Qformer.") for k in keys):
        raise UserError(f"{key} {path!r} is not a LAVIS BLIP-2 checkpoint (no Qformer.* weights); expected a "
                        f"stage-1 export directory or a LAVIS blip2 / blip2_opt / blip2_t5 .pth")
    return WeightSource(path, convert.LAVIS_BLIP2, key)


def holds_vit(source: WeightSource) -> bool:
    """Whether an init_from source carries the frozen ViT (exports do; LAVIS runner checkpoints do not)."""
    if source.layout is convert.STAGE1_EXPORT:
        return True
    return any(k.startswith("visual_encoder.") for k in source.files().keys())


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def vision_source(cfg: ModelConfig) -> WeightSource | None:
    """The frozen ViT's weights: from `init_from` when it holds them, else `vision.path` (None: random)."""
    if cfg.init_from:
        init = init_from_source(cfg.init_from)
        if holds_vit(init):
            recorded = read_model_config(cfg.init_from) if Path(cfg.init_from).is_dir() else None
            trained_on = recorded.vision.path if recorded is not None else None
            if cfg.vision.path and not (_same_path(cfg.vision.path, cfg.init_from)
                                        or (trained_on and _same_path(cfg.vision.path, trained_on))):
                raise UserError(
                    f"model.vision.path {cfg.vision.path!r} contradicts model.init_from {cfg.init_from!r}, which holds "
                    f"the frozen ViT it was trained against{f' ({trained_on!r})' if trained_on else ''}; "
                    f"remove model.vision.path")
            if recorded is not None and ln_vision_eps(recorded.vision) != ln_vision_eps(cfg.vision):
                raise UserError(f"model.init_from {cfg.init_from!r} was trained with ln_vision eps "
                                f"{ln_vision_eps(recorded.vision)}, this config uses {ln_vision_eps(cfg.vision)}; "
                                f"set model.vision.ln_vision_eps={ln_vision_eps(recorded.vision)}")
            if init.layout is convert.STAGE1_EXPORT:
                layout = convert.NATIVE_CLIP_VIT if is_native_config(init.config) else convert.BLIP2_DIR_VIT
                vit = WeightSource(init.path, layout, "model.init_from", init.config.get("vision_config"))
                _check_vision_config(vit, cfg.vision)
                return vit
            return init  # a LAVIS .pth holding visual_encoder.*: read through LAVIS_BLIP2
    if cfg.vision.path:
        return vision_source_at(cfg.vision.path, cfg.vision)
    return None


# ---------------------------------------------------------------------------------- BERT and the LLM
def bert_source(path: str, cfg: QFormerConfig | None = None,
                key: str = "model.qformer.init_from_bert") -> WeightSource:
    """A BERT directory (config.json model_type "bert"; pytorch_model.bin or model.safetensors), its sizes
    checked against `cfg` when given."""
    require_local_dir(path, key)
    data = read_json(Path(path) / "config.json", f"{key} config") if (Path(path) / "config.json").is_file() else {}
    if data.get("model_type", "bert") != "bert":
        raise UserError(f"{key} {path!r} holds a {data['model_type']!r} model; expected a BERT directory "
                        f"such as bert-base-uncased")
    source = WeightSource(path, convert.BERT, key, data)
    if cfg is not None:
        _check_qformer_sizes(source, data, cfg)
    return source


_QFORMER_FIELDS = (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                   ("num_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size"))


def _check_qformer_sizes(source: WeightSource, found: dict, cfg: QFormerConfig) -> None:
    for field, name in _QFORMER_FIELDS:
        if name in found and found[name] != getattr(cfg, field):
            raise UserError(f"{source.label} holds a Q-Former / BERT with {name} {found[name]}, the config expects "
                            f"{getattr(cfg, field)}: set model.qformer.{field} (or the preset) to match")


def check_init_from_sizes(source: WeightSource, cfg: ModelConfig) -> None:
    """The Q-Former (and queries) an init_from source holds fit `cfg` (read from config.json or shapes)."""
    if source.layout is convert.STAGE1_EXPORT:
        found = dict(source.config.get("qformer_config", {}))
        found["num_query_tokens"] = source.config.get("num_query_tokens")
    else:
        files = source.files()
        keys = files.keys()
        q = files.shape("query_tokens") if "query_tokens" in keys else (None, None, None)
        layers = {k.split(".")[4] for k in keys if k.startswith("Qformer.bert.encoder.layer.")}
        found = {"hidden_size": q[2], "num_hidden_layers": len(layers), "num_query_tokens": q[1]}
    _check_qformer_sizes(source, {k: v for k, v in found.items() if v is not None}, cfg.qformer)
    if found.get("num_query_tokens") not in (None, cfg.qformer.num_query_tokens):
        raise UserError(f"{source.label} holds {found['num_query_tokens']} queries, the config expects "
                        f"{cfg.qformer.num_query_tokens}: set model.qformer.num_query_tokens to match")


# ------------------------------------------------------------------------------------------ the check
def _random(part: str, key: str, cfg: ModelConfig) -> UserError:
    return UserError(f"{key} is not set, so the frozen {part} of preset {cfg.preset!r} would be random: set {key} "
                     f"(see docs/checkpoints.md) or model.allow_random_init=true for a deliberate random init")


def check_weight_sources(cfg: ModelConfig, stage: int) -> None:
    """Every weight source the config names exists, is of the right kind and size (read cheaply), and no
    frozen part of a non-tiny preset is random unless `model.allow_random_init`. Raises UserError."""
    if cfg.hf_path:
        require_local_dir(cfg.hf_path, "model.hf_path")
        taken = [k for k, v in (("model.vision.path", cfg.vision.path), ("model.llm.path", cfg.llm.path),
                                ("model.init_from", cfg.init_from)) if v]
        if taken:
            raise UserError(f"model.hf_path loads the whole model; remove {', '.join(taken)}")
        return
    vit = vision_source(cfg)  # also checks init_from and contradictions
    if cfg.init_from:
        check_init_from_sizes(init_from_source(cfg.init_from), cfg)
    if cfg.qformer.init_from_bert:
        bert_source(cfg.qformer.init_from_bert, cfg.qformer)
    if stage == 2 and cfg.llm.path:
        llm_config_at(cfg.llm.path, cfg.llm.kind)
    if cfg.preset.startswith("tiny") or cfg.allow_random_init:
        return
    if vit is None:
        raise _random("ViT", "model.vision.path", cfg)
    if stage == 2 and not cfg.llm.path:
        raise _random("LLM", "model.llm.path", cfg)
