"""Local files and directories a user names (weights, tokenizers, configs): one sentence when one is missing or
unreadable. Torch-free: the data pipeline's decode tasks check their tokenizer directories with it."""

from __future__ import annotations

import json
from pathlib import Path

from blip2_ray.errors import UserError


def _download_hint(path: str) -> str:
    return (f"(no network: download it once, e.g. `huggingface-cli download {path} --local-dir DIR`, and pass DIR)"
            if "/" in path and not Path(path).is_absolute() and not path.startswith(".") else "")


def require_local_dir(path: str, what: str) -> str:
    """`path` if it is a local directory, else one UserError naming `what` (a hub id gets the download hint)."""
    if not Path(path).is_dir():
        hint = _download_hint(path) or "(this project reads local directories only)"
        raise UserError(f"{what} {path!r} is not a local directory {hint}")
    return str(path)


def require_local_path(path: str, what: str) -> str:
    """`path` if it is a local file or directory, else one UserError naming `what`."""
    if not Path(path).exists():
        hint = _download_hint(path) or "(this project reads local files and directories only)"
        raise UserError(f"{what} {path!r} does not exist {hint}")
    return str(path)


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {str(path)!r} is not readable JSON ({e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {str(path)!r} holds no JSON object")
    return data
