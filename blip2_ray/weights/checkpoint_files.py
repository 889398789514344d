"""Weight files on local disk: finding them, reading their tensors lazily, and putting tensors into modules.

Everything here is plain PyTorch + safetensors. A checkpoint is read with `weights_only=True` (a pickle
that holds anything but tensors and plain containers is refused) and memory-mapped where the format
allows, so listing keys and shapes costs no memory and loading costs one copy in the target dtype.
`assign_weights` is the one place a state dict enters a module: unknown keys, missing keys and shape
mismatches are one `UserError` naming the first few keys and the file, never a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from blip2_ray.errors import UserError
from blip2_ray.model.partitioned import full_shape, is_partitioned
from blip2_ray.weights.local_files import read_json

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# HF directory layouts, in the order transformers prefers them
DIR_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json")


def load_torch_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a `.pth`/`.bin` file (weights only, memory-mapped when possible).

    A LAVIS checkpoint nests its state dict under "model" (next to "optimizer", "epoch"...); that
    level is unwrapped. Anything but tensors there is an error.
    """
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # files in the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects other than tensors are refused by weights_only
        raise UserError(f"{path!r} is not a plain tensor checkpoint that loads with weights_only "
                        f"({e.__class__.__name__}: {str(e).splitlines()[0][:160]})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path!r} holds no state dict (expected a mapping of parameter names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path!r} holds values that are not tensors under {bad[:3]}; expected a state dict")
    return obj


class TensorFiles:
    """Lazy, read-only access to the tensors of one weight file or of an HF directory (sharded or not),
    plus `extra` files (e.g. an export's stage-1 extras).

    `keys()` and `shape(k)` read only headers (safetensors) or memory maps (torch files); `get(k, dtype)`
    returns a fresh tensor in `dtype`. `label` names the file(s) in error messages.
    """

    def __init__(self, path: str, extra: tuple[str, ...] = ()):
        p = Path(path)
        self.label = str(p)
        if p.is_dir():
            files = self._dir_files(p)
        elif p.is_file():
            files = [p]
        else:
            raise UserError(f"weight file {path!r} does not exist")
        files += [Path(f) for f in extra]
        self._where: dict[str, Path] = {}
        self._torch: dict[Path, dict[str, torch.Tensor]] = {}
        self._safe: dict[Path, object] = {}
        for f in files:
            for k in self._file_keys(f):
                self._where[k] = f

    @staticmethod
    def _dir_files(d: Path) -> list[Path]:
        for name in DIR_WEIGHT_FILES:
            f = d / name
            if f.is_file():
                if name.endswith(".index.json"):
                    weight_map = read_json(f, "weight index").get("weight_map", {})
                    return [d / s for s in dict.fromkeys(weight_map.values())]
                return [f]
        raise UserError(f"directory {str(d)!r} holds no weights (none of {', '.join(DIR_WEIGHT_FILES)})")

    def _file_keys(self, f: Path) -> list[str]:
        if f.suffix == SAFETENSORS_SUFFIX:
            from safetensors import safe_open

            try:
                self._safe[f] = safe_open(str(f), framework="pt")
            except Exception as e:
                raise UserError(f"{str(f)!r} is not a readable safetensors file ({e.__class__.__name__})") from None
            return list(self._safe[f].keys())
        if f.suffix in TORCH_SUFFIXES:
            self._torch[f] = load_torch_file(str(f))
            return list(self._torch[f])
        raise UserError(f"{str(f)!r} is not a weight file (expected {SAFETENSORS_SUFFIX} or one of {TORCH_SUFFIXES})")

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._where[key]
        if f in self._safe:
            return tuple(self._safe[f].get_slice(key).get_shape())
        return tuple(self._torch[f][key].shape)

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        f = self._where[key]
        t = self._safe[f].get_tensor(key) if f in self._safe else self._torch[f][key]
        if dtype is not None and t.dtype != dtype and t.is_floating_point():
            return t.to(dtype)
        # a memory-mapped tensor is copied: the module must not depend on the file staying unchanged
        return t.clone() if f in self._torch else t


@torch.no_grad()
def load_into_partition(p: torch.Tensor, value: torch.Tensor) -> None:
    """Copy this rank's slice of `value` (the whole tensor, any dtype) into partitioned parameter `p`.

    The slice is cast to the partition's dtype. When the parameter is also whole right now (gathered, or
    persistent below DeepSpeed's threshold) that copy is written too.
    """
    part = p.ds_tensor
    n = part.numel()
    start = p.ds_zero_partition_rank * n
    flat = value.reshape(-1)
    chunk = flat[start:start + n]
    if chunk.numel():
        part.narrow(0, 0, chunk.numel()).copy_(chunk)
    if p.data.numel() == value.numel():
        p.data.copy_(value.reshape(p.data.shape))


class LazyTensors(Mapping):
    """A read-only mapping whose values are read when looked up (each lookup reads again, nothing is kept).

    Loading into partitioned parameters (model/partitioned.py) then holds one whole tensor at a time; the
    tensors of a rename plan (convert.convert_tensors) and of an LLM directory come this way.
    """

    def __init__(self, readers: dict[str, Callable[[], torch.Tensor]]):
        self._readers = readers

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._readers[key]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def renamed(self, rename: Callable[[str], str]) -> LazyTensors:
        return LazyTensors({rename(k): r for k, r in self._readers.items()})


def _listing(keys: Iterable[str], n: int = 4) -> str:
    keys = list(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def assign_weights(module: nn.Module, state: dict[str, torch.Tensor], source: str, *,
                   required: Iterable[str] | None = None, keep_dtype: bool = False) -> None:
    """Put `state` into `module` by assignment (the tensors become the parameters: no second copy).

    Each tensor is cast to the dtype the module holds at its key (`keep_dtype`: the state's dtype is
    kept, e.g. float32 trainable parts into a module loaded in bfloat16). A ZeRO-3 partitioned parameter
    (model/partitioned.py) is not replaced: this rank's slice of the tensor is copied into its partition.
    `required`: keys that must be in `state` (None: every key of the module). Keys the module lacks,
    shapes that differ and required keys missing are one UserError naming the first few keys and `source`.
    """
    own = module.state_dict(keep_vars=True)
    unknown = [k for k in state if k not in own]
    if unknown:
        raise UserError(f"{source} holds weights the model has no place for: {_listing(unknown)}")
    missing = [k for k in (own if required is None else required) if k not in state]
    if missing:
        raise UserError(f"{source} lacks weights the model needs: {_listing(missing)}")
    cast, wrong = {}, []
    for k in state:  # one lookup per key: a lazy state (LazyTensors) reads each tensor once
        v = state[k]
        if tuple(v.shape) != full_shape(own[k]):
            wrong.append(f"{k} {tuple(v.shape)} (model: {full_shape(own[k])})")
        elif is_partitioned(own[k]):
            load_into_partition(own[k], v)
        else:
            cast[k] = v if keep_dtype or v.dtype == own[k].dtype else v.to(own[k].dtype)
    if wrong:
        raise UserError(f"{source} does not fit the configured model (wrong size?): {_listing(wrong, 3)}")
    module.load_state_dict(cast, strict=False, assign=True)


def require_materialized(module: nn.Module, source: str) -> None:
    """After loading into a meta-built module: any parameter still on meta was in no file."""
    left = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if left:
        raise UserError(f"{source} lacks weights the model needs: {_listing(left)}")


def stored_bytes(module: nn.Module) -> int:
    """Bytes of the module's parameters and buffers as stored (each tensor counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
