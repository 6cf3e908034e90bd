"""Replace-one scoring: the KL divergence of the next-token distribution from the parent's when one candidate
block alone replaces its parent sub-block; also the held-out NLL of whole variants (for perplexity).

Both run layer by layer: only one parent block is in memory at a time, fed the cached hidden states."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from nasrt.quantize.blocks import DeciBlock, rotary

log = logging.getLogger(__name__)

#: Tokens per lm_head chunk (bounds the (tokens, vocab) logits buffers).
HEAD_CHUNK = 256


class Positions:
    """RoPE tables per sequence length (llama3 scaling included)."""

    def __init__(self, spec):
        self._rope = rotary(spec)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = h.shape[1]
        if t not in self._cache:
            self._cache[t] = self._rope(h, torch.arange(t).unsqueeze(0))
        return self._cache[t]


def run_block(block: DeciBlock, h: torch.Tensor, pos: Positions, batch: int = 8) -> torch.Tensor:
    """``block`` over ``h`` [N, T, H] in slices of ``batch`` sequences."""
    with torch.no_grad():
        return torch.cat([block(h[k:k + batch], pos(h)) for k in range(0, h.shape[0], batch)])


class Head:
    """Final RMSNorm + lm_head (float32), evaluated in token chunks."""

    def __init__(self, norm: torch.Tensor, lm_head: torch.Tensor, eps: float):
        self.norm, self.lm_head, self.eps = norm.float(), lm_head.float(), eps

    def log_probs(self, h: torch.Tensor) -> torch.Tensor:
        """``log_softmax(lm_head(norm(h)))`` of ``h`` [tokens, H]."""
        hf = h.float()
        hn = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        return torch.log_softmax(hn @ self.lm_head.T, dim=-1)

    def kl(self, parent: torch.Tensor, candidates: list[torch.Tensor]) -> list[float]:
        """Mean over tokens of KL(parent || candidate) for each candidate's last hidden states ([N, T, H] each)."""
        p_flat = parent.reshape(-1, parent.shape[-1])
        c_flat = [c.reshape(-1, c.shape[-1]) for c in candidates]
        sums = [0.0] * len(candidates)
        with torch.no_grad():
            for s in range(0, p_flat.shape[0], HEAD_CHUNK):
                lp = self.log_probs(p_flat[s:s + HEAD_CHUNK])
                p = lp.exp()
                for k, c in enumerate(c_flat):
                    lq = self.log_probs(c[s:s + HEAD_CHUNK])
                    sums[k] += float((p * (lp - lq)).sum())
        return [max(v / p_flat.shape[0], 0.0) for v in sums]

    def nll(self, h: torch.Tensor, targets: torch.Tensor) -> float:
        """Summed NLL of ``targets`` [tokens] given the last hidden states ``h`` [tokens, H]."""
        total = 0.0
        with torch.no_grad():
            for s in range(0, h.shape[0], HEAD_CHUNK):
                lp = self.log_probs(h[s:s + HEAD_CHUNK])
                total -= float(lp.gather(1, targets[s:s + HEAD_CHUNK, None]).sum())
        return total


def replace_one_kl(layer_idx: int, num_layers: int, first_outputs: list[torch.Tensor],
                   parent_final: torch.Tensor, load_parent_block: Callable[[int], DeciBlock], head: Head,
                   pos: Positions) -> list[float]:
    """KL of each candidate of layer ``layer_idx``: ``first_outputs[k]`` is the hidden state after layer
    ``layer_idx`` with candidate ``k`` swapped in ([N, T, H]); the later parent blocks run on all of them at once."""
    if not first_outputs:
        return []
    n = first_outputs[0].shape[0]
    h = torch.cat(first_outputs)
    for j in range(layer_idx + 1, num_layers):
        block = load_parent_block(j)
        h = run_block(block, h, pos, batch=max(n, 8))
        del block
    return head.kl(parent_final, list(h.split(n)))
