"""Error-compensating FP8 weight rounding (GPTQ, Frantar et al. 2022) on TensorRT-LLM's per-tensor grid.

Round-to-nearest rounds every weight on its own; GPTQ rounds the input columns one at a time and spreads each
column's rounding error over the columns not yet rounded, weighted by the layer input's second moment
``H = sum_t x_t x_t^T``, so the *output* error ``||X (W - Q)^T||`` is what is minimised. The result is still plain
FP8 codes under the same per-tensor weight scale: what the checkpoint stores and TensorRT-LLM consumes does not
change, only which neighbouring FP8 value each weight is given.

Columns go in decreasing ``H_jj`` (most active inputs first); ``H`` is damped by ``DAMP * mean(diag H)``. Inputs
never seen in calibration (``H_jj = 0``) are rounded to nearest and pass no error on.

The codes of a whole model do not stay in memory: :class:`RoundedWeights` writes each block's codes to a
safetensors file in a scratch directory and serves them back through a :class:`~nasrt.st_io.SafetensorsReader`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from nasrt.errors import CheckpointError
from nasrt.fp8 import FP8_DTYPE, dequantize, quantize

log = logging.getLogger(__name__)

DAMP = 0.01
BLOCK = 128
#: Inputs up to this width are factorised in float64; wider ones (a 51B's 8192..28672) in float32, to bound memory.
FLOAT64_MAX_INPUTS = 4096


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
def gptq_round(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 codes of ``weight`` ``[out, in]`` under per-tensor ``scale``, rounded by GPTQ with ``hessian`` ``[in, in]``.

    Runs on ``weight``'s device. Falls back to round-to-nearest (with a warning) when the damped Hessian is not
    positive definite.
    """
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"hessian {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    work = torch.float64 if hessian.shape[0] <= FLOAT64_MAX_INPUTS else torch.float32
    diag = torch.diag(hessian).to(device=weight.device, dtype=work)
    dead = diag == 0
    perm = torch.argsort(torch.where(dead, 1.0, diag), descending=True, stable=True)
    h = hessian.to(device=weight.device)[perm].to(work)[:, perm]  # one [in, in] scratch copy at a time
    h.diagonal()[dead[perm]] = 1.0
    u = _inverse_cholesky(h)
    del h
    if u is None:
        log.warning("GPTQ: the input second moment is not positive definite; rounding to nearest")
        return quantize(weight, scale)
    u = u.float()
    w = weight[:, perm].float()
    codes = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    n = w.shape[1]
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        err = torch.empty((w.shape[0], i2 - i1), dtype=torch.float32, device=w.device)
        for j in range(i1, i2):
            col = w[:, j]
            q = quantize(col, scale)
            codes[:, j] = q
            e = (col - dequantize(q, scale)) / u[j, j]
            w[:, j + 1:i2] -= e[:, None] * u[j, j + 1:i2][None, :]
            err[:, j - i1] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return codes[:, torch.argsort(perm)].contiguous()


def output_error(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace(dW H dW^T)`` = the summed squared output error over the calibration inputs, ``dW = W - deq(Q)``."""
    h = hessian.to(device=weight.device, dtype=torch.float32)
    total = 0.0
    for rows in range(0, weight.shape[0], 1024):  # row chunks: bounded temporaries
        d = weight[rows:rows + 1024].float() - dequantize(codes[rows:rows + 1024], scale)
        total += float(((d @ h) * d).sum())
    return total


class RoundedWeights:
    """FP8 codes chosen at calibration time, by HF weight name: written block by block to ``<dir>/rounded-*``
    files, read back (sliceable) once calibration is done. ``close()`` deletes them."""

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
