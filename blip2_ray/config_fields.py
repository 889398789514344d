"""The fields of a config section: `doc(...)` declares one with its documentation, its default and the bounds
its value must lie in; `check_bounds` checks them (blip2_ray.config runs it on every section it builds)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


def doc(text: str, default: Any = None, factory: Any = None, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field with its documentation (`metadata["doc"]`), shown by `describe` and the reference, and
    the bounds its value must lie in (`ge`: >=, `gt`: >, `le`: <=, `lt`: <), checked by `from_dict` before the
    section's own `validate()`; a field that may be None is not checked when it is None."""
    metadata: dict[str, Any] = {"doc": text}
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        metadata["bounds"] = bounds
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def bounds_text(bounds: dict[str, float]) -> str:
    """`{"ge": 0, "lt": 1}` -> "in [0, 1)", `{"gt": 0}` -> "> 0": how the reference and the errors say them."""
    low = next(((k, bounds[k]) for k in ("ge", "gt") if k in bounds), None)
    high = next(((k, bounds[k]) for k in ("le", "lt") if k in bounds), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    op, value = low or high  # type: ignore[misc]
    return f"{dict(ge='>=', gt='>', le='<=', lt='<')[op]} {value}"


def field_bounds(cls: type, name: str) -> dict[str, float] | None:
    """The bounds of field `name`: those its `doc(...)` names, or, where a subclass declares the field again
    (to change its default), those of the nearest base class that names them."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and "bounds" in f.metadata:
            return f.metadata["bounds"]
    return None


def check_bounds(obj: Any) -> None:
    """Every field of `obj` that has bounds lies in them (ValueError naming the field otherwise)."""
    for f in dataclasses.fields(obj):
        bounds = field_bounds(type(obj), f.name)
        value = getattr(obj, f.name)
        if not bounds or value is None:
            continue
        inside = all({"ge": value >= b, "gt": value > b, "le": value <= b, "lt": value < b}[op]
                     for op, b in bounds.items())
        if not inside:
            nullable = type(None) in typing.get_args(typing.get_type_hints(type(obj))[f.name])
            raise ValueError(f"{f.name} must be {bounds_text(bounds)}{' or null' if nullable else ''}, got {value}")
