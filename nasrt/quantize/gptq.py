"""Error-compensating FP8 weight rounding (GPTQ, Frantar et al. 2022) on TensorRT-LLM's per-tensor grid.

Round-to-nearest rounds every weight on its own; GPTQ rounds the input columns one at a time and spreads each
column's rounding error over the columns not yet rounded, weighted by the layer input's second moment
``H = sum_t x_t x_t^T``, so the *output* error ``||X (W - Q)^T||`` is what is minimised. The result is still plain
FP8 codes under the same per-tensor weight scale: what the checkpoint stores and TensorRT-LLM consumes does not
change, only which neighbouring FP8 value each weight is given.

Columns go in decreasing ``H_jj`` (most active inputs first); ``H`` is damped by ``DAMP * mean(diag H)``. Inputs
never seen in calibration (``H_jj = 0``) are rounded to nearest and pass no error on. Rows are independent given
``H``: the rows of a scale group's members (one input, one ``H``) are rounded together, in chunks of
:data:`ROW_CHUNK`.

Bounded memory at a 51B's widths (inputs 8192..28672): up to :data:`FULL_HESSIAN_MAX` inputs ``H`` is kept whole, in
float64; wider inputs keep only its diagonal blocks of :data:`WIDE_BLOCK` inputs, in float32
(:class:`InputHessian`), and GPTQ then compensates each column's error within its block only. That is the exact
GPTQ of the block-diagonal approximation of ``H``: ``in * WIDE_BLOCK`` floats instead of ``in^2`` (a 28672-wide
``down_proj``: 235 MiB instead of 3.1 GiB) and ``in / WIDE_BLOCK`` times less arithmetic. It costs quality: on
SmolLM2's own inputs (held-out text), GPTQ with the whole ``H`` leaves 0.12-0.16 of round-to-nearest's output error
on ``down_proj`` (1536 inputs), with blocks of a quarter of the width 0.40-0.47 and of an eighth 0.55-0.63; so
blocks are kept as wide as the memory bound allows, and the widest unit of a layer is rounded first (its ``H``
freed before the others are rounded).

The codes of a whole model do not stay in memory: :func:`gptq_pieces` hands them out one block of columns at a time,
and :class:`RoundedWeights` writes them to safetensors files in a scratch directory and serves them back (whole or
sliced) through a :class:`~nasrt.st_io.SafetensorsReader`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import torch

from nasrt.errors import CheckpointError
from nasrt.fp8 import FP8_DTYPE, FP8_MAX, dequantize, quantize
from nasrt.st_io import SafetensorsReader, write_safetensors_stream

log = logging.getLogger(__name__)

DAMP = 0.01
#: Columns per lazy batch update, and per inner one within it (:func:`_sweep`).
BLOCK = 128
SUB_BLOCK = 32
#: Inputs up to this width: the whole ``H``, summed and factorised in float64.
FULL_HESSIAN_MAX = 4096
#: Wider inputs: diagonal blocks of this many inputs, in float32.
WIDE_BLOCK = 2048
#: Weight rows rounded at once (rows are independent given ``H``): bounds the float32 working copy.
ROW_CHUNK = 4096
#: Weight rows :func:`output_error` is computed on (strided above this).
ERROR_ROWS = 512
#: FP8 codes kept in memory before :class:`RoundedWeights` writes them out.
FLUSH_BYTES = 16 << 20


def hessian_bounds(n: int) -> list[int]:
    """Input boundaries of the diagonal blocks of ``H`` kept for an ``n``-input linear."""
    if n <= FULL_HESSIAN_MAX:
        return [0, n]
    return list(range(0, n, WIDE_BLOCK)) + [n]


class InputHessian:
    """``sum_t x_t x_t^T`` over a linear's calibration inputs, as the diagonal blocks :func:`hessian_bounds` says
    (one block, float64, up to :data:`FULL_HESSIAN_MAX` inputs; blocks of :data:`WIDE_BLOCK`, float32, beyond)."""

    def __init__(self, n: int):
        self.bounds = hessian_bounds(n)
        self.dtype = torch.float64 if len(self.bounds) == 2 else torch.float32
        self.blocks: list[torch.Tensor] = []

    @property
    def size(self) -> int:
        return self.bounds[-1]

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` ``[tokens, in]`` (float32)."""
        if x.shape[-1] != self.size:
            raise ValueError(f"inputs of width {x.shape[-1]} added to a Hessian of {self.size} inputs")
        parts = [x[:, a:b] for a, b in pairwise(self.bounds)]
        prods = [(p.T @ p).cpu().to(self.dtype) for p in parts]
        if not self.blocks:
            self.blocks = prods
        else:
            for blk, prod in zip(self.blocks, prods, strict=True):
                blk.add_(prod)

    def spans(self):
        """``(start, stop, block)`` per diagonal block."""
        return ((a, b, blk) for (a, b), blk in zip(pairwise(self.bounds), self.blocks, strict=True))

    @classmethod
    def of(cls, hessian: torch.Tensor) -> InputHessian:
        """The blocks of a full ``[in, in]`` matrix this class keeps for that width."""
        h = cls(hessian.shape[0])
        h.blocks = [hessian[a:b, a:b].to(h.dtype).clone() for a, b in pairwise(h.bounds)]
        return h


def _as_blocks(hessian: torch.Tensor | InputHessian, weight: torch.Tensor) -> InputHessian:
    if isinstance(hessian, torch.Tensor):
        if hessian.shape != (weight.shape[1], weight.shape[1]):
            raise ValueError(f"hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
        h = InputHessian(hessian.shape[0])
        h.bounds, h.blocks = [0, hessian.shape[0]], [hessian]  # a full matrix is used whole
        return h
    if hessian.size != weight.shape[1]:
        raise ValueError(f"hessian of {hessian.size} inputs does not match weight {tuple(weight.shape)}")
    return hessian


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of ``(H + damping)^-1``, retrying with more damping; None if hopeless. ``h`` is
    damped in place (it is a scratch copy)."""
    mean = float(torch.diag(h).mean())
    if not mean > 0:
        return None
    added = 0.0
    for damp in (DAMP, 0.1, 1.0):
        h.diagonal().add_((damp - added) * mean)
        added = damp
        try:
            inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            continue
    return None


@torch.no_grad()
def gptq_round(weights: torch.Tensor | Sequence[torch.Tensor], hessian: torch.Tensor | InputHessian,
               scale: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
    """FP8 codes of ``weights`` (one ``[out, in]`` tensor, or several reading the same input: a scale group) under
    per-tensor ``scale``, rounded by GPTQ with ``hessian`` (a full ``[in, in]`` matrix, or an
    :class:`InputHessian`: then block by block). Returns one codes tensor per weight (a tensor for a tensor);
    :func:`gptq_pieces` hands them out a block of columns at a time instead."""
    single = isinstance(weights, torch.Tensor)
    ws = [weights] if single else list(weights)
    codes = [torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device) for w in ws]
    for i, a, b, piece in gptq_pieces(ws, hessian, scale):
        codes[i][:, a:b] = piece
    return codes[0] if single else codes


@torch.no_grad()
def gptq_pieces(weights: Sequence[torch.Tensor], hessian: torch.Tensor | InputHessian, scale: torch.Tensor):
    """GPTQ codes of ``weights`` (reading one input) as ``(weight index, first column, stop column, codes)``, one
    diagonal block of ``hessian`` at a time (a block's columns are final once it is done).

    Rows are independent given ``H``: the rows of all weights, as if concatenated, are rounded in chunks of
    :data:`ROW_CHUNK`. Runs on the weights' device. A block whose damped Hessian is not positive definite is
    rounded to nearest (with a warning).
    """
    h = _as_blocks(hessian, weights[0])
    for w in weights[1:]:
        _as_blocks(h, w)
    for a, b, blk in h.spans():  # one block's factorisation at a time (bounded memory)
        factor = _factor(blk, weights[0].device)
        if factor is None:
            log.warning("GPTQ: the input second moment is not positive definite; rounding to nearest")
            for i, w in enumerate(weights):
                yield i, a, b, quantize(w[:, a:b], scale)
            continue
        perm, u = factor
        inv = torch.argsort(perm)
        out = [torch.empty((w.shape[0], b - a), dtype=FP8_DTYPE, device=w.device) for w in weights]
        for pieces in _row_chunks([w.shape[0] for w in weights]):
            wt = torch.empty((b - a, sum(hi - lo for _, lo, hi in pieces)), dtype=torch.float32,
                             device=weights[0].device)
            k = 0
            for i, lo, hi in _sub_rows(pieces):  # [in, rows], permuted: the sweep reads contiguous columns
                wt[:, k:k + hi - lo] = weights[i][lo:hi, a:b][:, perm].T
                k += hi - lo
            swept = _sweep(wt, u, scale)
            del wt
            k = 0
            for i, lo, hi in _sub_rows(pieces):
                out[i][lo:hi] = swept[:, k:k + hi - lo][inv].T
                k += hi - lo
            del swept
        for i in range(len(weights)):
            yield i, a, b, out[i]
            out[i] = None


def _row_chunks(counts: list[int]):
    """Chunks of :data:`ROW_CHUNK` rows over the concatenation of weights with ``counts`` rows, each as
    ``[(weight index, first row, stop row)]``."""
    pieces, room = [], ROW_CHUNK
    for i, n in enumerate(counts):
        lo = 0
        while lo < n:
            hi = min(n, lo + room)
            pieces.append((i, lo, hi))
            room -= hi - lo
            lo = hi
            if room == 0:
                yield pieces
                pieces, room = [], ROW_CHUNK
    if pieces:
        yield pieces


def _sub_rows(pieces: list[tuple[int, int, int]], step: int = 1024):
    """``pieces`` split into runs of at most ``step`` rows (bounded gather temporaries)."""
    for i, lo, hi in pieces:
        for r in range(lo, hi, step):
            yield i, r, min(hi, r + step)


def _factor(hessian: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(perm, U)``: the act-order permutation (decreasing ``H_jj``, unseen inputs last) and the upper Cholesky
    factor of the permuted, damped ``H^-1`` (float32); None if not positive definite. Factorised in ``H``'s own
    precision (float64 for a whole ``H``, float32 for the blocks of a wide one)."""
    work = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    diag = torch.diag(hessian).to(device=device, dtype=work)
    dead = diag == 0
    perm = torch.argsort(torch.where(dead, 1.0, diag), descending=True, stable=True)
    h = hessian.to(device=device)[perm].to(work)[:, perm]  # one scratch copy at a time
    h.diagonal()[dead[perm]] = 1.0
    u = _inverse_cholesky(h)
    return None if u is None else (perm, u.float())


def _sweep(wt: torch.Tensor, u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """GPTQ's sweep over the input columns: ``wt`` ``[in, rows]`` (permuted, float32, contiguous, overwritten), ``u``
    the upper Cholesky factor of the inverse damped Hessian; returns the codes ``[in, rows]`` (permuted).

    Lazy updates on two levels: a column's error reaches the next columns of its :data:`SUB_BLOCK` at once, the
    rest of its :data:`BLOCK` after each sub-block, and the columns beyond after each block (matrix products
    instead of memory-bound rank-1 updates; the same arithmetic up to summation order)."""
    codes = torch.empty(wt.shape, dtype=FP8_DTYPE, device=wt.device)
    s = float(scale.reshape(()))
    diag = torch.diagonal(u).tolist()
    n = wt.shape[0]
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        err = torch.empty((i2 - i1, wt.shape[1]), dtype=torch.float32, device=wt.device)
        for k1 in range(i1, i2, SUB_BLOCK):
            k2 = min(k1 + SUB_BLOCK, i2)
            for j in range(k1, k2):
                codes[j] = wt[j].div(s).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)  # = quantize(wt[j], scale)
                e = err[j - i1]
                torch.sub(wt[j], codes[j].float().mul_(s), out=e).div_(diag[j])
                if j + 1 < k2:
                    wt[j + 1:k2].addr_(u[j, j + 1:k2], e, alpha=-1)
            if k2 < i2:
                wt[k2:i2].addmm_(u[k1:k2, k2:i2].T, err[k1 - i1:k2 - i1], alpha=-1)
        if i2 < n:
            wt[i2:].addmm_(u[i1:i2, i2:].T, err, alpha=-1)
    return codes


def output_error(weight: torch.Tensor, codes: torch.Tensor | None, scale: torch.Tensor,
                 hessian: torch.Tensor | InputHessian) -> float:
    """``trace(dW H dW^T)`` = the summed squared output error over the calibration inputs, ``dW = W - deq(Q)``
    (``codes`` None: round-to-nearest; with an :class:`InputHessian`: over its diagonal blocks). Above
    :data:`ERROR_ROWS` rows it is estimated on evenly strided rows, scaled to all of them."""
    return sum(block_error(weight[:, a:b], None if codes is None else codes[:, a:b], scale, blk)
               for a, b, blk in _as_blocks(hessian, weight).spans())


def block_error(weight: torch.Tensor, codes: torch.Tensor | None, scale: torch.Tensor, h: torch.Tensor) -> float:
    """:func:`output_error` of one diagonal block: ``weight`` and ``codes`` its columns, ``h`` its ``H``."""
    step = -(-weight.shape[0] // ERROR_ROWS)
    k = weight.shape[0] / -(-weight.shape[0] // step)
    weight = weight[::step]
    codes = quantize(weight, scale) if codes is None else codes[::step]
    h = h.to(device=weight.device, dtype=torch.float32)
    d = weight.float() - dequantize(codes, scale)
    return float(((d @ h) * d).sum()) * k


class RoundedWeights:
    """FP8 codes chosen at calibration time, by HF weight name, possibly added a block of columns at a time:
    written to ``<dir>/rounded-*`` files (at every :meth:`flush`, and whenever :data:`FLUSH_BYTES` are pending),
    read back whole or sliced once calibration is done. ``close()`` deletes them."""

    def __init__(self, parent: str | Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="nasrt-rounded-", dir=parent))
        self._pending: dict[str, torch.Tensor] = {}
        self._files = 0
        self._scales: dict[str, torch.Tensor] = {}
        self._pieces: dict[str, list[tuple[int, int]]] = {}  # name -> column spans, as added
        self._reader = None

    def add(self, name: str, codes: torch.Tensor, scale: torch.Tensor, column: int = 0) -> None:
        """Codes of ``name`` (from ``column`` on, for a block of columns), rounded under ``scale``."""
        if codes.dtype != FP8_DTYPE:
            raise ValueError(f"{name}: rounded weights must be FP8 codes, got {codes.dtype}")
        scale = scale.detach().float().reshape(()).cpu().clone()
        if name in self._scales and float(self._scales[name]) != float(scale):
            raise ValueError(f"{name}: columns rounded under two weight scales")
        self._scales[name] = scale
        self._pieces.setdefault(name, []).append((column, column + codes.shape[1]))
        self._pending[f"{name}@{column}"] = codes.contiguous().cpu()
        self._reader = None  # reopened (with these codes) at the next read
        if sum(t.numel() for t in self._pending.values()) >= FLUSH_BYTES:
            self.flush()

    def check_scale(self, name: str, scale: torch.Tensor) -> None:
        """Refuse to serve codes under a scale other than the one they were rounded for."""
        if float(self._scales[name]) != float(scale.reshape(())):
            raise CheckpointError(f"{name}: FP8 codes were rounded for weight scale {float(self._scales[name])!r}, "
                                  f"the export uses {float(scale.reshape(()))!r}")

    def flush(self) -> None:
        """Write the codes added since the last flush."""
        if self._pending:
            self._files += 1
            pending, self._pending = self._pending, {}
            write_safetensors_stream(self.dir / f"rounded-{self._files:05d}.safetensors",
                                     [(n, t.dtype, tuple(t.shape)) for n, t in pending.items()],
                                     (pending.pop(n) for n in list(pending)))

    def __contains__(self, name: str) -> bool:
        return name in self._scales

    def __len__(self) -> int:
        return len(self._scales)

    def _spans(self, name: str) -> list[tuple[int, int]]:
        if name not in self._scales:
            raise CheckpointError(f"no rounded FP8 codes for {name!r}")
        spans = sorted(self._pieces[name])
        if spans[0][0] != 0 or any(b != c for (_, b), (c, _) in pairwise(spans)):
            raise CheckpointError(f"{name}: rounded FP8 codes cover columns {spans}, not one contiguous range")
        return spans

    def _open(self) -> SafetensorsReader:
        if self._reader is None:
            self.flush()
            self._reader = SafetensorsReader(self.dir)
        return self._reader

    def get(self, name: str) -> torch.Tensor:
        parts = [self._open().get(f"{name}@{a}") for a, _ in self._spans(name)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """``codes[start:stop]`` (``dim`` 0) or ``codes[:, start:stop]`` (``dim`` 1)."""
        reader = self._open()
        if dim == 0:
            parts = [reader.read(f"{name}@{a}", 0, start, stop) for a, _ in self._spans(name)]
        elif dim == 1:
            parts = [reader.read(f"{name}@{a}", 1, max(start, a) - a, min(stop, b) - a)
                     for a, b in self._spans(name) if a < stop and b > start]
        else:
            raise ValueError(f"{name}: rounded FP8 codes are read along dim 0 or 1, not {dim}")
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def close(self) -> None:
        self._reader = None
        self._pending = {}
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RoundedWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
