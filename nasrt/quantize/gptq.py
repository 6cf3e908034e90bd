"""Error-compensating FP8 weight rounding (GPTQ, Frantar et al. 2022) on TensorRT-LLM's per-tensor grid.

Round-to-nearest rounds every weight on its own; GPTQ rounds the input columns one at a time and spreads each
column's rounding error over the columns not yet rounded, weighted by the layer input's second moment
``H = sum_t x_t x_t^T``, so the *output* error ``||X (W - Q)^T||`` is what is minimised. The result is still plain
FP8 codes under the same per-tensor weight scale: what the checkpoint stores and TensorRT-LLM consumes does not
change, only which neighbouring FP8 value each weight is given.

Columns go in decreasing ``H_jj`` (most active inputs first); ``H`` is damped by ``DAMP * mean(diag H)``. Inputs
never seen in calibration (``H_jj = 0``) are rounded to nearest and pass no error on. Rows are independent given
``H``: they are rounded in chunks of :data:`ROW_CHUNK`, and the members of a scale group one after the other.

Bounded memory at a 51B's widths (inputs 8192..28672): up to :data:`FULL_HESSIAN_MAX` inputs ``H`` is kept whole, in
float64; wider inputs keep only its diagonal blocks of :data:`WIDE_BLOCK` inputs, in float32
(:class:`InputHessian`), and GPTQ then compensates each column's error within its block only. That is the exact
GPTQ of the block-diagonal approximation of ``H``: ``in * WIDE_BLOCK`` floats instead of ``in^2`` (a 28672-wide
``down_proj``: 235 MiB instead of 3.1 GiB) and ``in / WIDE_BLOCK`` times less arithmetic.

The codes of a whole model do not stay in memory: :class:`RoundedWeights` writes each block's codes to a
safetensors file in a scratch directory and serves them back through a :class:`~nasrt.st_io.SafetensorsReader`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from itertools import pairwise
from pathlib import Path

import torch
from safetensors.torch import save_file

from nasrt.errors import CheckpointError
from nasrt.fp8 import FP8_DTYPE, dequantize, quantize

log = logging.getLogger(__name__)

DAMP = 0.01
#: Columns per lazy batch update.
BLOCK = 128
#: Inputs up to this width: the whole ``H``, summed and factorised in float64.
FULL_HESSIAN_MAX = 4096
#: Wider inputs: diagonal blocks of this many inputs, in float32.
WIDE_BLOCK = 2048
#: Weight rows rounded at once (rows are independent given ``H``): bounds the float32 working copy.
ROW_CHUNK = 4096
#: Weight rows :func:`output_error` is computed on (strided above this).
ERROR_ROWS = 2048
#: FP8 codes kept in memory before :class:`RoundedWeights` writes them out.
FLUSH_BYTES = 64 << 20


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
        self._factors: list | None = None

    @property
    def size(self) -> int:
        return self.bounds[-1]

    def add(self, x: torch.Tensor) -> None:
        """Add the inputs ``x`` ``[tokens, in]`` (float32)."""
        if self._factors is not None:
            raise ValueError("inputs added to a Hessian already factorised")
        if x.shape[-1] != self.size:
            raise ValueError(f"inputs of width {x.shape[-1]} added to a Hessian of {self.size} inputs")
        parts = [x[:, a:b] for a, b in pairwise(self.bounds)]
        prods = [(p.T @ p).cpu().to(self.dtype) for p in parts]
        if not self.blocks:
            self.blocks = prods
        else:
            for blk, prod in zip(self.blocks, prods, strict=True):
                blk.add_(prod)

    def factors(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """:func:`_factor` of every block, computed once (q/k/v, gate/up share them)."""
        if self._factors is None:
            self._factors = [_factor(blk, device) for blk in self.blocks]
        return self._factors

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
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor | InputHessian, scale: torch.Tensor) -> torch.Tensor:
    """FP8 codes of ``weight`` ``[out, in]`` under per-tensor ``scale``, rounded by GPTQ with ``hessian`` (a full
    ``[in, in]`` matrix, or an :class:`InputHessian`: then block by block, its factorisations kept for the next
    weight rounded with it).

    Runs on ``weight``'s device. A block whose damped Hessian is not positive definite is rounded to nearest (with
    a warning).
    """
    h = _as_blocks(hessian, weight)
    codes = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
    for (a, b, _), factor in zip(h.spans(), h.factors(weight.device), strict=True):
        if factor is None:
            log.warning("GPTQ: the input second moment is not positive definite; rounding to nearest")
            codes[:, a:b] = quantize(weight[:, a:b], scale)
            continue
        perm, u = factor
        inv = torch.argsort(perm)
        for r in range(0, weight.shape[0], ROW_CHUNK):  # rows are independent: bounded working copy
            wt = weight[r:r + ROW_CHUNK, a:b].T[perm].float().contiguous()  # [in, rows]: columns contiguous
            codes[r:r + ROW_CHUNK, a:b] = _sweep(wt, u, scale)[inv].T
    return codes


def _factor(hessian: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(perm, U)``: the act-order permutation (decreasing ``H_jj``, unseen inputs last) and the upper Cholesky
    factor of the permuted, damped ``H^-1`` (float32); None if not positive definite."""
    work = torch.float64 if hessian.shape[0] <= FULL_HESSIAN_MAX else torch.float32
    diag = torch.diag(hessian).to(device=device, dtype=work)
    dead = diag == 0
    perm = torch.argsort(torch.where(dead, 1.0, diag), descending=True, stable=True)
    h = hessian.to(device=device)[perm].to(work)[:, perm]  # one scratch copy at a time
    h.diagonal()[dead[perm]] = 1.0
    u = _inverse_cholesky(h)
    return None if u is None else (perm, u.float())


def _sweep(wt: torch.Tensor, u: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """GPTQ's sweep over the input columns: ``wt`` ``[in, rows]`` (permuted, float32, contiguous, overwritten), ``u``
    the upper Cholesky factor of the inverse damped Hessian; returns the codes ``[in, rows]`` (permuted)."""
    codes = torch.empty(wt.shape, dtype=FP8_DTYPE, device=wt.device)
    n = wt.shape[0]
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        err = torch.empty((i2 - i1, wt.shape[1]), dtype=torch.float32, device=wt.device)
        for j in range(i1, i2):
            q = quantize(wt[j], scale)
            codes[j] = q
            e = (wt[j] - dequantize(q, scale)) / u[j, j]
            wt[j + 1:i2] -= u[j, j + 1:i2, None] * e[None, :]
            err[j - i1] = e
        wt[i2:] -= u[i1:i2, i2:].T @ err
    return codes


def output_error(weight: torch.Tensor, codes: torch.Tensor | None, scale: torch.Tensor,
                 hessian: torch.Tensor | InputHessian) -> float:
    """``trace(dW H dW^T)`` = the summed squared output error over the calibration inputs, ``dW = W - deq(Q)``
    (``codes`` None: round-to-nearest; with an :class:`InputHessian`: over its diagonal blocks). Above
    :data:`ERROR_ROWS` rows it is estimated on evenly strided rows, scaled to all of them."""
    step = -(-weight.shape[0] // ERROR_ROWS)
    k = weight.shape[0] / -(-weight.shape[0] // step)
    weight = weight[::step]
    codes = quantize(weight, scale) if codes is None else codes[::step]
    total = 0.0
    for a, b, blk in _as_blocks(hessian, weight).spans():
        h = blk.to(device=weight.device, dtype=torch.float32)
        for rows in range(0, weight.shape[0], 1024):  # row chunks: bounded temporaries
            d = weight[rows:rows + 1024, a:b].float() - dequantize(codes[rows:rows + 1024, a:b], scale)
            total += float(((d @ h) * d).sum())
    return total * k


class RoundedWeights:
    """FP8 codes chosen at calibration time, by HF weight name: written to ``<dir>/rounded-*`` files (at every
    :meth:`flush`, and whenever :data:`FLUSH_BYTES` are pending), read back (sliceable) once calibration is done.
    ``close()`` deletes them."""

    def __init__(self, parent: str | Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="nasrt-rounded-", dir=parent))
        self._pending: dict[str, torch.Tensor] = {}
        self._files = 0
        self._scales: dict[str, torch.Tensor] = {}
        self._reader = None

    def add(self, name: str, codes: torch.Tensor, scale: torch.Tensor) -> None:
        if codes.dtype != FP8_DTYPE:
            raise ValueError(f"{name}: rounded weights must be FP8 codes, got {codes.dtype}")
        self._pending[name] = codes.contiguous().cpu()
        self._scales[name] = scale.detach().float().reshape(()).cpu().clone()
        if sum(t.numel() for t in self._pending.values()) >= FLUSH_BYTES:
            self.flush()

    def check_scale(self, name: str, scale: torch.Tensor) -> None:
        """Refuse to serve codes under a scale other than the one they were rounded for."""
        if float(self._scales[name]) != float(scale.reshape(())):
            raise CheckpointError(f"{name}: FP8 codes were rounded for weight scale {float(self._scales[name])!r}, "
                                  f"the export uses {float(scale.reshape(()))!r}")

    def flush(self) -> None:
        """Write the codes added since the last flush (one file per calibrated block)."""
        if self._pending:
            self._files += 1
            save_file(self._pending, str(self.dir / f"rounded-{self._files:05d}.safetensors"))
            self._pending = {}

    def __contains__(self, name: str) -> bool:
        return name in self._scales

    def __len__(self) -> int:
        return len(self._scales)

    def _open(self):
        from nasrt.st_io import SafetensorsReader

        if self._reader is None:
            self.flush()
            self._reader = SafetensorsReader(self.dir)
        return self._reader

    def get(self, name: str) -> torch.Tensor:
        if name not in self._scales:
            raise CheckpointError(f"no rounded FP8 codes for {name!r}")
        return self._open().get(name)

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if name not in self._scales:
            raise CheckpointError(f"no rounded FP8 codes for {name!r}")
        return self._open().read(name, dim, start, stop)

    def close(self) -> None:
        self._reader = None
        self._pending = {}
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RoundedWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
