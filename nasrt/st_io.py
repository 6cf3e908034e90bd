"""safetensors input and output: a validated lazy reader over (sharded) files and a streaming writer.

Nothing here ever loads a pickle. The reader opens files with ``safe_open`` and serves one slice of one
tensor at a time; the writer lays out the header from shapes known in advance and then streams tensor
bytes, so a rank file is written without holding it in memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from nasrt.arch import read_json
from nasrt.errors import CheckpointError

DTYPE_TO_ST: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float8_e4m3fn: "F8_E4M3",
    torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
ST_TO_DTYPE: dict[str, torch.dtype] = {v: k for k, v in DTYPE_TO_ST.items()}
DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                       "bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}


def torch_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """``'bfloat16'`` -> ``torch.bfloat16`` with an error naming the flag."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise CheckpointError(f"{flag} {name!r} is not one of {sorted(DTYPE_NAMES)}") from None


class SafetensorsReader:
    """Lazy, validated access to the tensors of one directory (single file or index + shards)."""

    def __init__(self, model_dir: str | Path, pattern: str | None = None):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: model directory not found")
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        index = self.dir / "model.safetensors.index.json"
        if pattern is None and index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map'")
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise CheckpointError(f"{index}: shard file(s) named in the index are missing: {missing}")
            for name, fname in weight_map.items():
                self._file_of[name] = self.dir / fname
            for path in sorted(set(self._file_of.values())):
                present = set(self._open(path).keys())
                absent = [n for n, p in self._file_of.items() if p == path and n not in present]
                if absent:
                    raise CheckpointError(f"{path}: tensor(s) listed in {index.name} are absent: {absent[:5]}")
        else:
            files = sorted(self.dir.glob(pattern or "*.safetensors"))
            if not files:
                bins = sorted(p.name for p in self.dir.glob("*.bin"))
                hint = f" ({bins} are pickle files and are never loaded)" if bins else ""
                raise CheckpointError(f"{self.dir}: no *.safetensors weight files{hint}")
            for path in files:
                for name in self._open(path).keys():
                    if name in self._file_of:
                        raise CheckpointError(f"{path}: tensor {name!r} also in {self._file_of[name]}")
                    self._file_of[name] = path

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own SafetensorError / OSError
                raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
            self._handles[path] = handle
        return handle

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _slice(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        return self._open(self._file_of[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        st = self._slice(name).get_dtype()
        if st not in ST_TO_DTYPE:
            raise CheckpointError(f"{self._file_of[name]}: tensor {name!r} has unsupported dtype {st}")
        return ST_TO_DTYPE[st]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        try:
            return self._open(self._file_of[name]).get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{self._file_of[name]}: cannot read tensor {name!r} ({exc})") from None

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (``dim`` 0) or columns (``dim`` 1) ``[start, stop)`` of ``name``, clipped at the end."""
        sl = self._slice(name)
        shape = sl.get_shape()
        stop = min(stop, shape[dim])
        try:
            if len(shape) == 1 or dim == 0 and start == 0 and stop == shape[0]:
                return sl[:] if (start, stop) == (0, shape[dim]) else sl[start:stop]
            return sl[start:stop] if dim == 0 else sl[:, start:stop]
        except Exception as exc:
            raise CheckpointError(f"{self._file_of[name]}: cannot read tensor {name!r} ({exc})") from None


class DictReader:
    """The :class:`SafetensorsReader` interface over in-memory tensors (used by the FP8 path and tests)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name!r} is missing")
        return self.tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._get(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        t = self._get(name)
        stop = min(stop, t.shape[dim])
        return t.narrow(dim, start, stop - start)


def write_safetensors_stream(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                             tensors: Iterable[torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors (named, typed and shaped by ``specs``) arrive one at a time."""
    header: dict[str, Any] = {}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        count = 0
        for (name, dtype, shape), t in zip(specs, tensors):
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, "
                                      f"planned {dtype} {tuple(shape)}")
            fh.write(t.reshape(-1).contiguous().view(torch.uint8).numpy().data if t.numel() else b"")
            count += 1
        if count != len(specs):
            raise CheckpointError(f"{path}: {count} tensors written, {len(specs)} planned")
