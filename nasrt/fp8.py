"""Per-tensor FP8 (E4M3) arithmetic shared by the quantizer, the checkpoint writer and the reference runtime."""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def scale_from_amax(amax: torch.Tensor | float) -> torch.Tensor:
    """ModelOpt's per-tensor scale: ``amax / 448`` as float32 ``[1]``."""
    return (torch.as_tensor(amax, dtype=torch.float32) / FP8_MAX).reshape(1)


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``fp8(clamp(x / scale, -448, 448))``."""
    s = scale.to(torch.float32).reshape(())
    return (x.to(torch.float32) / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` in ``dtype``."""
    return (q.to(torch.float32) * scale.to(torch.float32).reshape(())).to(dtype)


def fake_quant(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize to FP8 and back (same dtype as ``x``): what an FP8 GEMM input or FP8 KV cache sees."""
    return dequantize(quantize(x, scale), scale, x.dtype)
