"""safetensors input and output: a validated lazy reader over (sharded) files and a streaming writer.

Nothing here ever loads a pickle. The reader opens files with ``safe_open`` and serves one slice of one
tensor at a time; the writer lays out the header from shapes known in advance and then streams tensor
bytes, so a rank file is written without holding it in memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
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
#: Column slices are gathered through a row buffer of at most this many bytes.
_CHUNK_BYTES = 64 << 20
DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16,
                                       "bfloat16": torch.bfloat16, "float8_e4m3fn": torch.float8_e4m3fn}


def torch_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """``'bfloat16'`` -> ``torch.bfloat16`` with an error naming the flag."""
    try:
        return DTYPE_NAMES[name]
    except KeyError:
        raise CheckpointError(f"{flag} {name!r} is not one of {sorted(DTYPE_NAMES)}") from None


@dataclass(frozen=True)
class FileRange:
    """``nbytes`` bytes at absolute ``offset`` of ``path``: a tensor piece that can be copied file to file."""

    path: Path
    offset: int
    nbytes: int


#: safetensors dtypes that are weights; integer / bool tensors are refused by name (never cast to a float).
FLOAT_ST_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3")


def check_weight_map(index: Path, data: dict[str, Any]) -> dict[str, str]:
    """The ``weight_map`` of a parsed ``model.safetensors.index.json``: an object of tensor name -> shard file
    name, each a plain relative path inside the directory (no absolute paths, no ``..``)."""
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must be a JSON object of tensor name -> file name, "
                              f"got {type(weight_map).__name__}")
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or not fname:
            raise CheckpointError(f"{index}: weight_map[{name!r}] = {fname!r} must be a file name (a string)")
        if Path(fname).is_absolute() or ".." in Path(fname).parts or "\\" in fname or "\x00" in fname:
            raise CheckpointError(f"{index}: weight_map[{name!r}] = {fname!r} points outside the model directory "
                                  "(absolute paths and '..' are refused)")
    return weight_map


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_weight_file(path: Path, model_dir: Path, allow_external: bool = False) -> None:
    """A weight file is read only if it is a regular file (a FIFO or device would block or never end) that
    resolves inside ``model_dir``. Symlinks out of the directory are refused unless ``allow_external``, except
    into a Hugging Face cache's ``blobs`` folder (``snapshots/<rev>/x -> ../../blobs/<hash>``)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file; only regular files are read as weights")
    if allow_external:
        return
    root, real = model_dir.resolve(), path.resolve()
    hf_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if not _inside(real, root) and not (hf_blobs is not None and _inside(real, hf_blobs)):
        raise CheckpointError(f"{path}: resolves to {real}, outside the model directory {root} "
                              "(pass --allow_external_files to read it)")


class SafetensorsReader:
    """Lazy, validated access to the tensors of one directory (single file or index + shards)."""

    def __init__(self, model_dir: str | Path, pattern: str | None = None, allow_external: bool = False):
        self.dir = Path(model_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: model directory not found")
        self.allow_external = allow_external
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._fds: dict[Path, int] = {}
        self._layouts: dict[Path, dict[str, tuple[str, list[int], int]]] = {}
        index = self.dir / "model.safetensors.index.json"
        if pattern is None and index.exists():
            weight_map = check_weight_map(index, read_json(index))
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).exists()})
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
                for name in self._open(path).keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name in self._file_of:
                        raise CheckpointError(f"{path}: tensor {name!r} also in {self._file_of[name]}")
                    self._file_of[name] = path

    def _open(self, path: Path):
        handle = self._handles.get(path)
        if handle is None:
            check_weight_file(path, self.dir, self.allow_external)
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

    def check_floating(self, names: Iterable[str]) -> None:
        """Every tensor of ``names`` has a floating-point dtype (weights; integers are never silently cast)."""
        for name in names:
            st = self._slice(name).get_dtype()
            if st not in FLOAT_ST_DTYPES:
                raise CheckpointError(f"{self._file_of[name]}: tensor {name!r} has dtype {st}; weights must be "
                                      f"floating point ({', '.join(FLOAT_ST_DTYPES)})")

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
        """Rows (``dim`` 0) or columns (``dim`` 1) ``[start, stop)`` of ``name``, clipped at the end.

        Bytes are read with ``pread`` straight into the result tensor (no mmap), so the process keeps only the
        tensors it is working on resident, never the mapped source files.
        """
        if name not in self._file_of:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        path = self._file_of[name]
        st_dtype, shape, begin = self._layout(path)[name]
        if st_dtype not in ST_TO_DTYPE:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {st_dtype}")
        dtype = ST_TO_DTYPE[st_dtype]
        if not shape:
            out = torch.empty((), dtype=dtype)
            self._pread_into(path, name, out, begin)
            return out
        stop = min(stop, shape[dim])
        esize = torch.empty((), dtype=dtype).element_size()
        if dim == 0:
            row_bytes = math.prod(shape[1:]) * esize
            out = torch.empty((stop - start, *shape[1:]), dtype=dtype)
            self._pread_into(path, name, out, begin + start * row_bytes)
            return out
        if dim != 1 or len(shape) != 2:
            raise CheckpointError(f"{path}: tensor {name!r} {shape}: only row or column slices of matrices")
        rows, cols = shape
        out = torch.empty((rows, stop - start), dtype=dtype)
        step = max(1, _CHUNK_BYTES // max(1, cols * esize))
        buf = torch.empty((min(step, rows), cols), dtype=dtype)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            self._pread_into(path, name, buf[: r1 - r0], begin + r0 * cols * esize)
            out[r0:r1] = buf[: r1 - r0, start:stop]
        return out

    def byte_range(self, name: str, dim: int, start: int, stop: int) -> FileRange | None:
        """Where :meth:`read` ``(name, dim, start, stop)`` lies in its file, if it is one contiguous byte range
        (whole tensors and row slices; not column slices nor slices that need zero padding)."""
        if name not in self._file_of:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        path = self._file_of[name]
        st_dtype, shape, begin = self._layout(path)[name]
        if st_dtype not in ST_TO_DTYPE:
            return None
        esize = torch.empty((), dtype=ST_TO_DTYPE[st_dtype]).element_size()
        if not shape:
            return FileRange(path, begin, esize)
        if stop > shape[dim]:
            return None
        if dim == 1 and len(shape) == 2 and (start, stop) == (0, shape[1]):
            dim, stop = 0, shape[0]
        if dim != 0:
            return None
        row_bytes = math.prod(shape[1:]) * esize
        return FileRange(path, begin + start * row_bytes, (stop - start) * row_bytes)

    def _layout(self, path: Path) -> dict[str, tuple[str, list[int], int]]:
        """name -> (dtype, shape, absolute byte offset) from the file's header (already validated by safe_open)."""
        layout = self._layouts.get(path)
        if layout is None:
            self._open(path)
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            layout = {k: (v["dtype"], list(v["shape"]), 8 + n + v["data_offsets"][0])
                      for k, v in header.items() if k != "__metadata__"}
            self._layouts[path] = layout
        return layout

    def _pread_into(self, path: Path, name: str, out: torch.Tensor, offset: int) -> None:
        nbytes = out.numel() * out.element_size()
        if not nbytes:
            return
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{path}: file ends inside tensor {name!r} (truncated?)")
            done += got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._handles.clear()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


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

    def check_floating(self, names: Iterable[str]) -> None:
        for name in names:
            if not self._get(name).dtype.is_floating_point:
                raise CheckpointError(f"tensor {name!r} has dtype {self._get(name).dtype}; weights must be floating "
                                      "point")

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def get(self, name: str) -> torch.Tensor:
        return self._get(name)

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        t = self._get(name)
        stop = min(stop, t.shape[dim])
        return t.narrow(dim, start, stop - start)


def write_safetensors_stream(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                             tensors: Iterable[torch.Tensor | Sequence[FileRange]],
                             metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose tensors (named, typed and shaped by ``specs``) arrive one at a time.

    An item is a tensor, or a list of :class:`FileRange` whose bytes (concatenated) are the tensor: those are
    copied file to file by the kernel (``copy_file_range``), never passing through this process's memory.
    """
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
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    src_fds: dict[Path, int] = {}
    try:
        _write_all(fd, struct.pack("<Q", len(blob)) + blob)
        # explicit next() instead of zip(): zip's reused result tuple would keep the previous tensor alive
        # while the producer builds the next one (peak = two tensors instead of one)
        source = iter(tensors)
        count = 0
        for name, dtype, shape in specs:
            t = next(source, None)
            if t is None:
                break
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if isinstance(t, torch.Tensor):
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise CheckpointError(f"{path}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, "
                                          f"planned {dtype} {tuple(shape)}")
                data = memoryview(t.reshape(-1).contiguous().view(torch.uint8).numpy()) if t.numel() else b""
                for off in range(0, len(data), _CHUNK_BYTES):  # bounded writes keep dirty-page throttling smooth
                    _write_all(fd, data[off:off + _CHUNK_BYTES])
                del data
            else:
                if sum(r.nbytes for r in t) != want:
                    raise CheckpointError(f"{path}: tensor {name!r}: source ranges hold "
                                          f"{sum(r.nbytes for r in t)} bytes, planned {want}")
                for r in t:
                    _copy_range(r, fd, src_fds, name)
            del t
            count += 1
        if count != len(specs):
            raise CheckpointError(f"{path}: {count} tensors written, {len(specs)} planned")
    finally:
        os.close(fd)
        for sfd in src_fds.values():
            os.close(sfd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view):]


def _copy_range(r: FileRange, dst: int, src_fds: dict[Path, int], name: str) -> None:
    """Append ``r`` to ``dst`` with ``copy_file_range`` (pread + write where the kernel cannot)."""
    src = src_fds.get(r.path)
    if src is None:
        src = src_fds[r.path] = os.open(r.path, os.O_RDONLY)
    done = 0
    while done < r.nbytes:
        n = -1
        if _COPY_FILE_RANGE[0]:
            try:
                n = os.copy_file_range(src, dst, min(r.nbytes - done, 1 << 30), r.offset + done)
            except OSError:  # EXDEV, ENOSYS, EOPNOTSUPP, EINVAL ...: fall back for this process
                _COPY_FILE_RANGE[0] = False
        if n < 0:
            chunk = os.pread(src, min(r.nbytes - done, _CHUNK_BYTES), r.offset + done)
            _write_all(dst, chunk)
            n = len(chunk)
        if n == 0:
            raise CheckpointError(f"{r.path}: file ends inside tensor {name!r} (truncated?)")
        done += n


#: whether os.copy_file_range works here (switched off at the first failure)
_COPY_FILE_RANGE = [hasattr(os, "copy_file_range")]
