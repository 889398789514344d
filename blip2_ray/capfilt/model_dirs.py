"""What a local HF model directory holds, checked before any actor starts; where and in what dtype models run.

A CapFilt model is named by a directory and a kind (`captioner.kind`, `filter.kind`). `require_model`
reads the directory's config.json (model_type, architectures) and the files the kind's processor needs,
so a wrong or incomplete directory is one sentence in the driver instead of a failure in every actor.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from blip2_ray.errors import UserError
from blip2_ray.weights.export_kinds import read_dir_config

# the config.json model_type of a BLIP-2 export: HF's, or ours for a CLIP ViT-L model (weights/native_format.py)
BLIP2_DIR_TYPES = ("blip-2", "blip2_ray")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def model_name(path: str) -> str:
    """The directory's own name (e.g. 'blip-image-captioning-large'): what the output's provenance records."""
    return os.path.basename(os.path.normpath(path))


def read_config(path: str, what: str) -> dict:
    """config.json of a local model directory as a dict; UserError naming `what` if absent or unreadable."""
    return read_dir_config(path, what, "CapFilt loads only local HF-format directories (download one with "
                           "`huggingface-cli download <id> --local-dir DIR`)",
                           "pass the directory that `save_pretrained` or the training job's export wrote")


def require_model(path: str, what: str, kind_key: str, kind: str, model_type: str | tuple[str, ...],
                  architectures: tuple[str, ...], files: dict[str, tuple[str, ...]]) -> dict:
    """Check that `path` holds a `model_type` model (or one of several) of one of `architectures` and one file of
    each group in `files` ({description: any of these names}); its config.json. UserError otherwise, naming the fix."""
    cfg = read_config(path, what)
    found_type, found_arch = cfg.get("model_type"), list(cfg.get("architectures") or [])
    types = (model_type,) if isinstance(model_type, str) else model_type
    if found_type not in types or (found_arch and not set(found_arch) & set(architectures)):
        raise UserError(
            f"{what} {path!r} holds a {'/'.join(found_arch) or found_type or 'unknown'} model (config.json "
            f"model_type {found_type!r}), but {kind_key}={kind} needs a {' or '.join(architectures)} directory; "
            f"point {what} at one or change {kind_key}")
    groups = {"weights": WEIGHT_FILES, **files}
    for description, names in groups.items():
        if not any(os.path.isfile(os.path.join(path, n)) for n in names):
            raise UserError(f"{what} {path!r} has no {description} ({' or '.join(names)}); copy the whole model "
                            f"repository (e.g. `huggingface-cli download <id> --local-dir DIR`)")
    return cfg


def load_or_user_error(load, path: str, what: str):
    """`load(path)` (a from_pretrained call), any loading failure turned into one UserError sentence."""
    try:
        return load(path)
    except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {path!r} could not be loaded ({e.__class__.__name__}: {str(e)[:200]})") from None


def require_model_and_processor(path: str, what: str, kind_key: str, kind: str, model_type: str,
                                architectures: tuple[str, ...], tokenizer_files: tuple[str, ...], processor_class,
                                default_vocab: int, text_tower: str) -> None:
    """`require_model` for a directory with an image processor and a tokenizer, plus: the processor loads, and
    its tokenizer fits the text tower's vocabulary (`default_vocab` when config.json's text_config has none)."""
    cfg = require_model(path, what, kind_key, kind, model_type, architectures,
                        {"image processor config": IMAGE_PROCESSOR_FILES, "tokenizer": tokenizer_files})
    processor = load_or_user_error(lambda p: processor_class.from_pretrained(p, local_files_only=True), path,
                                   f"{what} processor")
    vocab = (cfg.get("text_config") or {}).get("vocab_size", default_vocab)
    if len(processor.tokenizer) > vocab:
        raise UserError(f"{what} {path!r}: its tokenizer has {len(processor.tokenizer)} tokens but the {text_tower} "
                        f"only {vocab}; the tokenizer files belong to another model")


@dataclass(frozen=True)
class HubLayout:
    """What a hub model directory with an image processor and a tokenizer holds (BLIP-large, CLIP ViT-L/14): its
    `check(path)` is `require_model_and_processor` with these values (`processor`: the transformers class)."""

    kind_key: str
    kind: str
    model_type: str
    architectures: tuple[str, ...]
    tokenizer_files: tuple[str, ...]
    processor: str
    default_vocab: int
    text_tower: str

    def check(self, path: str, what: str | None = None) -> None:
        """UserError unless `path` is a complete local directory of this kind (config, weights, processor)."""
        import transformers

        require_model_and_processor(path, what or self.kind_key.replace(".kind", ".model"), self.kind_key, self.kind,
                                    self.model_type, self.architectures, self.tokenizer_files,
                                    getattr(transformers, self.processor), self.default_vocab, self.text_tower)
