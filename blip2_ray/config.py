"""One typed config system for every job: dataclass defaults <- YAML of overrides <- `--set a.b=value`.

A job's config is a tree of dataclasses. `load_config(JobConfig, path, sets)` starts from the defaults,
applies the YAML file (only the keys it names), then each `--set key=value` (the value parsed as YAML),
checks every value against the field's type, and calls `validate()` on each section that has one.
Unknown keys are an error that names the valid keys at that level. `to_dict`/`from_dict` turn a config
into plain data and back, which is how a job hands a section to a Ray worker.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from blip2_ray.config_fields import bounds_text, check_bounds, field_bounds
from blip2_ray.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A user error in a config file or a `--set` override (the message is one sentence)."""


def require_input_and_output(cfg: Any) -> None:
    """The checks of a job that reads shards and writes a directory (CapFilt, the search index): at least one
    `input` source and an `output_dir`."""
    if not cfg.input:
        raise ValueError("input must name at least one source")
    if not cfg.output_dir:
        raise ValueError("output_dir must be set")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting where it is lossless (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return _build(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            # a single string where a list of strings is expected is a common shorthand
            if args and args[0] is str and isinstance(value, str):
                value = [value]
            else:
                raise ConfigError(f"{where}: expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, f"{where} key"): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type[T], data: dict, where: str) -> T:
    # A section may name a preset whose values sit beneath the keys given explicitly.
    apply_preset = getattr(cls, "apply_preset", None)
    if callable(apply_preset):
        data = apply_preset(data, where)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys at "
            f"{'the top level' if not where else repr(where)}: {', '.join(sorted(fields))}"
        )
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}" if where else name)
    for name in fields:
        # sections not mentioned are still built through _build, so their presets and checks apply
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, f"{where}.{name}" if where else name)
    obj = cls(**kwargs)
    return obj


def _validate_tree(obj: Any, where: str = "") -> None:
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(v):
            _validate_tree(v, key)
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if dataclasses.is_dataclass(item):
                    _validate_tree(item, f"{key}[{i}]")
    validate = getattr(obj, "validate", None)
    try:
        check_bounds(obj)
        if callable(validate):
            validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A config (or any value inside one) as plain YAML/JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def merge(base: dict, override: dict) -> dict:
    """`base` with `override` on top, mappings merged key by key (neither argument is changed)."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(cls: type[T], data: dict | None = None) -> T:
    """Build and validate a config of type `cls` from the defaults overridden by `data`."""
    obj = _build(cls, dict(data or {}), "")
    _validate_tree(obj)
    return obj


_SET_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)$")


def _set_key(item: str) -> tuple[list[str | int], Any]:
    """`a.b[1].c=value` -> (["a", "b", 1, "c"], value), the value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.max_steps=100")
    key, raw = item.split("=", 1)
    path: list[str | int] = []
    for m in (_SET_PART.match(part) for part in key.strip().split(".")):
        if not m:
            raise ConfigError(f"--set {item!r}: the key must be dotted names (a list item as name[index]), "
                              "e.g. train.max_steps or instruct.sources[0].train")
        path += [m.group(1), *(int(i) for i in re.findall(r"\d+", m.group(2)))]
    try:
        return path, (yaml.safe_load(raw) if raw.strip() else "")
    except yaml.YAMLError:
        return path, raw


def parse_set(item: str) -> dict:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}, the value parsed as YAML (a list index: see `apply_set`)."""
    path, value = _set_key(item)
    for p in reversed(path):
        if isinstance(p, int):
            raise ConfigError(f"--set {item!r}: a list index needs the config it changes (load_config applies it)")
        value = {p: value}
    return value


def apply_set(data: dict, item: str) -> dict:
    """`data` with one `--set key=value` applied: dotted names merge into mappings; `name[i]` changes item i of a
    list the config already holds (e.g. instruct.sources[1].train=...), an index outside it is an error."""
    path, value = _set_key(item)
    if not any(isinstance(p, int) for p in path):
        return merge(data, parse_set(item))
    out = cur = copy.deepcopy(data)
    for n, p in enumerate(path):
        where = "".join(f"[{q}]" if isinstance(q, int) else f".{q}" for q in path[:n]).lstrip(".")
        if isinstance(p, int) and not isinstance(cur, list):
            raise ConfigError(f"--set {item!r}: the config holds no list at {where}")
        if isinstance(p, int) and p >= len(cur):
            raise ConfigError(f"--set {item!r}: {where} holds {len(cur)} item(s) in the config, so index {p} is "
                              "outside it")
        if isinstance(p, str) and not isinstance(cur, dict):
            raise ConfigError(f"--set {item!r}: {where} is not a mapping")
        if n == len(path) - 1:
            cur[p] = value
        elif isinstance(p, str) and p not in cur and isinstance(path[n + 1], str):
            cur = cur.setdefault(p, {})
        else:
            cur = cur[p] if isinstance(p, int) else cur.get(p)
    return out


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, not {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, sets: list[str] | None = None) -> T:
    """Defaults of `cls` <- YAML file at `path` <- each `--set key=value` in order."""
    data: dict = read_yaml(path) if path else {}
    for item in sets or []:
        data = apply_set(data, item)
    return from_dict(cls, data)


def dump_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) rows for every leaf key: the configuration reference (a doc ends with the
    field's bounds, where it has any).

    A field's doc is its `metadata["doc"]` (set with `field(metadata={"doc": ...})`) or the
    `#:` comment convention is not parsed; keep docs in metadata.
    """
    rows = []
    hints = _hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, key + "."))
        else:
            text = f.metadata.get("doc", "")
            bounds = field_bounds(cls, f.name)
            if bounds:
                text = f"{text} (must be {bounds_text(bounds)})"
            rows.append((key, _type_name(tp), getattr(default, f.name), text))
    return rows
