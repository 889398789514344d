"""Which model directories the Serve app can serve, decided before Ray Serve deploys anything.

A replica that cannot load its model fails inside Serve's deploy loop, which retries it and buries the reason
in tracebacks. `check_servable(cfg)` reads each named directory's `config.json` and file list instead (no
weights, well under a second) and refuses what the app cannot serve in one sentence (a UserError): a stage-1
export named as the caption model, a stage-2 export as the retrieval model, a directory that holds no model,
a kind the app does not serve. `blip2-ray serve` runs it before Ray starts; `build_app` (so `serve run`
too) before composing the deployments.

`SERVABLE` is the one table of what each config key accepts: export kind (`weight_sources.export_kind`:
"stage1", "stage2", "vqa") -> the endpoints it answers. Serving another kind is one entry here plus its
deployment.
"""

from __future__ import annotations

import os

from blip2_ray.errors import UserError
from blip2_ray.weights.export_kinds import (  # torch-free: this check answers in well under a second
    export_kind,
    read_dir_config,
)

SERVABLE: dict[str, dict[str, str]] = {
    "model": {"stage2": "caption, vqa and chat",
              "vqa": "vqa, chat and caption, the question read by its Q-Former"},
    "retrieval_model": {"stage1": "embeddings and match"},
}
WHAT = {  # how each kind is named in messages
    "stage1": "a stage-1 (retrieval) export: a Blip2ForImageTextRetrieval directory",
    "stage2": "a stage-2 export: a Blip2ForConditionalGeneration directory",
    "vqa": ("a VQA fine-tune whose Q-Former reads the question (InstructBlipForConditionalGeneration "
            "layout)"),
}
FLAGS = {"model": "--model", "retrieval_model": "--retrieval-model"}
NOT_YET: dict[str, str] = {}  # kind -> what to do instead, for a kind no key serves yet
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
_PROCESSOR = ("preprocessor_config.json", "processor_config.json")


def _name(key: str) -> str:
    return f"{key} ({FLAGS[key]})"


def model_kind(path: str, key: str) -> str:
    """The export kind of the directory `path` named by config key `key`; UserError when it holds no model
    this project exports (no config.json, another model type, no weights, no tokenizer or image processor)."""
    want = " or ".join(WHAT[k] for k in SERVABLE[key])
    data = read_dir_config(path, _name(key), f"it needs {want}",
                           f"it needs {want}, e.g. the output_dir of a training run")
    kind = export_kind(data)
    if kind is None:
        raise UserError(f"{_name(key)} {path!r} holds a {data.get('model_type')!r} model; it needs {want}")
    for what, names in (("weights", _WEIGHTS), ("tokenizer", _TOKENIZER), ("image processor config", _PROCESSOR)):
        if not any(os.path.isfile(os.path.join(path, n)) for n in names):
            raise UserError(f"{_name(key)} {path!r} has no {what} ({' or '.join(names)}); export the model again "
                            f"or copy the whole directory")
    return kind


def check_servable(cfg) -> dict[str, str]:
    """{config key: export kind} of the ServeConfig's model directories; UserError (one sentence naming the
    directory, what it is and what the key needs, and where it belongs instead) for any the app cannot serve."""
    kinds = {}
    for key in ("model", "retrieval_model"):
        path = getattr(cfg, key)
        if not path:
            continue
        kind = model_kind(path, key)
        if kind not in SERVABLE[key]:
            other = next((k for k, accepted in SERVABLE.items() if k != key and kind in accepted), None)
            fix = (f"give it as {_name(other)}" if other else NOT_YET.get(kind, "it cannot be served"))
            want = " or ".join(f"{WHAT[k]} (for {serves})" for k, serves in SERVABLE[key].items())
            raise UserError(f"{_name(key)} {path!r} is {WHAT[kind]}, but {key} needs {want}; {fix}")
        kinds[key] = kind
    return kinds
