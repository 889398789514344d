"""The text path of a question-aware Q-Former (model/question_qformer.py), read from where it was trained.

A stage-2 model arrives with a queries-only `Blip2QFormerModel` (BLIP-2 stage 2 drops the Q-Former's text
path): `make_question_aware` moves its weights into an `InstructBlipQFormerModel` and reads the text embeddings
and text FFNs from a stage-1 source (our stage-1 export / a `Blip2ForImageTextRetrieval` directory / a LAVIS
stage-1 .pth, whose Q-Former was trained with them) or from bert-base-uncased (InstructBLIP's start).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from blip2_ray.errors import UserError
from blip2_ray.model.partitioned import parameters_on_meta
from blip2_ray.model.question_qformer import question_qformer_config
from blip2_ray.weights import convert
from blip2_ray.weights.checkpoint_files import assign_weights
from blip2_ray.weights.local_files import read_json

# our stage-1 names of the text path -> the question-aware Q-Former's (keys under `qformer.`)
_TEXT_PATH = re.compile(r"^(embeddings\.(word_embeddings|position_embeddings)\.weight"
                        r"|qformer\.encoder\.layer\.\d+\.(intermediate|output)\.(dense|LayerNorm)\.(weight|bias))$")


def text_path_source(path: str, key: str):
    """The WeightSource of a text path: a BERT directory, else a stage-1 source (UserError if neither)."""
    from blip2_ray.weights.weight_sources import bert_source, init_from_source

    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file() and read_json(p / "config.json", f"{key} config").get(
            "model_type") == "bert":
        return bert_source(path, key=key)
    return init_from_source(path, key)


def text_path_tensors(path: str, key: str) -> tuple[dict[str, torch.Tensor], str]:
    """The Q-Former text path of a stage-1 source or a BERT directory under our stage-1 names (float32),
    and the source's label; UserError when the source holds none."""
    source = text_path_source(path, key)
    files = source.files()
    keys = [k for k in files.keys() if not re.match(r"^(vision_model\.|visual_encoder\.)", k)]
    plan = convert.plan_conversion(source.layout, keys, source.label)
    wanted = {k: parts for k, parts in plan.sources.items() if _TEXT_PATH.match(k)}
    if not any(k.startswith("embeddings.word_embeddings") for k in wanted):
        raise UserError(f"{source.label} holds no Q-Former text embeddings; name a stage-1 export, a "
                        f"Blip2ForImageTextRetrieval directory, a LAVIS stage-1 .pth or bert-base-uncased")
    plan.sources = wanted
    lazy = convert.convert_tensors(plan, files, {})
    return {k: lazy[k].float() for k in lazy}, source.label


def make_question_aware(model: nn.Module, text_from: str, key: str = "vqa.question_encoder_from") -> None:
    """Replace `model.qformer` (a queries-only Blip2QFormerModel) by an InstructBlipQFormerModel holding the
    same weights plus the text path read from `text_from`; in place, float32. Any weight left unread is an
    error naming it (no random init)."""
    from transformers import InstructBlipQFormerModel

    old = model.qformer
    tensors, label = text_path_tensors(text_from, key)
    vocab, hidden = tensors["embeddings.word_embeddings.weight"].shape
    if hidden != old.config.hidden_size:
        raise UserError(f"{label} has a {hidden}-wide Q-Former; the model's is {old.config.hidden_size} wide")
    cfg = question_qformer_config(old.config, vocab)
    with parameters_on_meta():
        new = InstructBlipQFormerModel(cfg)
    state = {}
    for k, v in old.state_dict().items():
        state[k.replace("layernorm.", "embeddings.layernorm.", 1) if k.startswith("layernorm.") else k] = v
    for k, v in tensors.items():
        ours = k.replace("qformer.", "", 1) if k.startswith("qformer.") else k
        if ours == "embeddings.position_embeddings.weight":
            v = v[: cfg.max_position_embeddings]
        state[ours] = v
    assign_weights(new, state, f"the stage-2 Q-Former and {label}")
    new.train(old.training)
    model.qformer = new
