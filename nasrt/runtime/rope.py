"""Rotary position embedding (NeoX rotate-half) with optional llama3 frequency scaling, as precomputed tables."""

from __future__ import annotations

import math

import torch

from nasrt.arch import Llama3Rope


def inv_freq(head_dim: int, theta: float, scaling: Llama3Rope | None = None) -> torch.Tensor:
    """float32 ``[head_dim / 2]`` inverse frequencies ``theta^(-2i/hd)``, llama3-scaled when ``scaling`` is set."""
    freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    if scaling is None:
        return freq
    l0 = scaling.original_max_position_embeddings
    lo_wl, hi_wl = l0 / scaling.low_freq_factor, l0 / scaling.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > lo_wl, freq / scaling.factor, freq)
    s = (l0 / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - s) * scaled / scaling.factor + s * scaled
    medium = (wavelen >= hi_wl) & (wavelen <= lo_wl)
    return torch.where(medium, smoothed, scaled)


class RopeTable:
    """cos/sin tables ``[positions, head_dim]`` (float32), computed once and grown on demand."""

    def __init__(self, head_dim: int, theta: float, scaling: Llama3Rope | None, device: torch.device,
                 dtype: torch.dtype, initial: int = 4096):
        self.inv_freq = inv_freq(head_dim, theta, scaling).to(device)
        self.dtype = dtype
        self.cos = self.sin = torch.empty(0, head_dim, device=device, dtype=dtype)
        self._grow(initial)

    def _grow(self, n: int) -> None:
        pos = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]  # (n, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (n, hd)
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``(B, 1, T, hd)`` for integer ``positions`` ``(B, T)``."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0]:
            self._grow(max(need, 2 * self.cos.shape[0]))
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX-style rotation of ``x`` ``(B, heads, T, hd)`` (dims i and i + hd/2 pair up)."""
    return x * cos + rotate_half(x) * sin
