"""Initialising the cheaper blocks from the parent: least-squares linear layers, mean-pooled KV heads, FFN channels
ranked by calibrated contribution, and optional block-wise local distillation (BLD)."""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Relative ridge of the least-squares fits (times the mean diagonal of X^T X); keeps rank-deficient fits finite.
DEFAULT_RIDGE = 1e-6


class LeastSquares:
    """Accumulates ``X^T X`` and ``X^T Y`` (float64) over batches; :meth:`solve` gives ``W`` with ``y ≈ W x``."""

    def __init__(self, n_in: int, n_out: int):
        self.xtx = torch.zeros(n_in, n_in, dtype=torch.float64)
        self.xty = torch.zeros(n_in, n_out, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double()
        y2 = y.reshape(-1, y.shape[-1]).double()
        self.xtx += x2.T @ x2
        self.xty += x2.T @ y2
        self.count += x2.shape[0]

    def solve(self, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
        """The ``[out, in]`` float32 weight of the ridge-regularised least-squares fit."""
        if not self.count:
            raise ValueError("least-squares fit without data")
        n = self.xtx.shape[0]
        lam = ridge * float(self.xtx.diagonal().mean()) + 1e-12
        a = self.xtx + lam * torch.eye(n, dtype=torch.float64)
        return torch.linalg.solve(a, self.xty).T.float().contiguous()


def merge_kv_heads(w: torch.Tensor, kv_to: int, head_dim: int) -> torch.Tensor:
    """K or V projection ``[kv*hd, H]`` with each group of ``kv/kv_to`` consecutive heads mean-pooled into one.

    Query head ``j`` reads KV head ``j // (nh/kv)``, so consecutive KV heads are the ones whose query heads merge.
    The mean is taken in float64, so identical heads merge into exactly themselves.
    """
    kv_from = w.shape[0] // head_dim
    if kv_from % kv_to:
        raise ValueError(f"cannot merge {kv_from} KV heads into {kv_to}")
    r = kv_from // kv_to
    merged = w.double().reshape(kv_to, r, head_dim, w.shape[1]).mean(dim=1)
    return merged.reshape(kv_to * head_dim, w.shape[1]).to(w.dtype)


class ChannelStats:
    """Mean absolute activation of each FFN channel (the input of ``down_proj``) over the calibration set."""

    def __init__(self, width: int):
        self.abs_sum = torch.zeros(width, dtype=torch.float64)
        self.count = 0

    def add(self, act: torch.Tensor) -> None:
        a = act.reshape(-1, act.shape[-1])
        self.abs_sum += a.abs().double().sum(0)
        self.count += a.shape[0]

    def order(self, down: torch.Tensor) -> torch.Tensor:
        """Channels by Puzzle's contribution ``C_i = mean|X_i| * ||W_down[:, i]||`` (largest first)."""
        contrib = self.abs_sum / max(self.count, 1) * down.double().norm(dim=0)
        return torch.argsort(contrib, descending=True, stable=True)


def keep_channels(order: torch.Tensor, width: int) -> torch.Tensor:
    """The ``width`` most important channels, in their original (ascending) order."""
    return torch.sort(order[:width]).values


def narrow_ffn(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, keep: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SwiGLU weights restricted to the channels ``keep``."""
    return gate[keep].contiguous(), up[keep].contiguous(), down[:, keep].contiguous()


def normalised_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Puzzle's BLD loss ``MSE(target, out) / MSE(target, 0)``."""
    return ((out - target) ** 2).mean() / (target ** 2).mean().clamp_min(1e-20)


def distill(module: nn.Module, inputs: list[tuple], targets: list[torch.Tensor], steps: int, lr: float = 1e-4,
            call=None) -> tuple[float, float]:
    """Block-wise local distillation: train ``module``'s floating parameters for ``steps`` Adam steps so that
    ``call(module, *inputs[k])`` matches ``targets[k]`` (cycling over the batches). Returns the normalised MSE
    over all batches before and after (the initialisation is kept if training made it worse)."""
    call = call or (lambda m, *x: m(*x))
    params = [p for p in module.parameters() if p.is_floating_point()]

    def loss_all() -> float:
        with torch.no_grad():
            return float(sum(normalised_mse(call(module, *x), t) for x, t in zip(inputs, targets, strict=True))
                         / len(inputs))

    before = loss_all()
    if steps <= 0 or not params:
        return before, before
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        k = step % len(inputs)
        opt.zero_grad()
        loss = normalised_mse(call(module, *inputs[k]), targets[k])
        loss.backward()
        opt.step()
    for p in params:
        p.requires_grad_(False)
    after = loss_all()
    if after > before:  # never hand back a block the distillation made worse
        log.debug("BLD raised the loss (%.4g -> %.4g); keeping the initialisation", before, after)
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        after = before
    return before, after
