"""Decoder sub-blocks of the reference runtime, one class per layer variant, found through a kind registry.

Every sub-block maps the residual stream ``h`` ``(B, T, H)`` to the new residual stream (a no-op returns ``h``
itself), so the decoder loop never branches on the variant. Semantics per variant:
``shared/reference/decilm-architecture.md`` section 5. Tensor names come from :mod:`nasrt.tensor_map`.

FP8 checkpoints (``quant_algo == "FP8"``): float8 weights are dequantized once with ``weights_scaling_factor``
and the input of each such linear goes through FP8 and back with ``activation_scaling_factor``. With
``kv_cache_quant_algo == "FP8"`` K (after RoPE) and V go through FP8 with the layer's ``kv_cache_scaling_factor``
before attention reads them, in prefill, decode and full recomputation alike, so the three agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from nasrt.arch import AttnKind, FfnKind, LayerSpec, ModelSpec
from nasrt.errors import CheckpointError
from nasrt.fp8 import FP8_DTYPE, dequantize, fake_quant
from nasrt.runtime.rope import apply_rope
from nasrt.tensor_map import (
    ACT_SCALE,
    ATTENTION_RULES,
    FFN_RULES,
    INPUT_NORM,
    KV_SCALE,
    POST_NORM,
    WEIGHT_SCALE,
    TensorRule,
)


@dataclass(frozen=True)
class LoadContext:
    """What a sub-block needs to pick its tensors out of a merged checkpoint."""

    spec: ModelSpec
    tensors: dict[str, torch.Tensor]
    dtype: torch.dtype
    device: torch.device
    fp8_kv_cache: bool = False

    def get(self, name: str) -> torch.Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
        return self.tensors[name]

    def tensor(self, name: str) -> torch.Tensor:
        """A non-quantized tensor (norm, embedding) in the compute dtype."""
        return self.get(name).to(device=self.device, dtype=self.dtype).contiguous()


@dataclass
class StepContext:
    """Per-forward inputs shared by every layer: RoPE tables, attention mask and (optionally) the KV cache."""

    cos: torch.Tensor  # (B, 1, T, hd)
    sin: torch.Tensor  # (B, 1, T, hd)
    mask: torch.Tensor | None  # (B, 1, T, S) bool, True = may attend; None = see is_causal
    is_causal: bool
    cache: KVCache | None = None
    start: int = 0  # cache slot of the first of the T new tokens


class KVCache:
    """Static K/V buffers ``(B, kv, S, hd)``, one pair per attention layer only, sized by that layer's KV heads."""

    def __init__(self, spec: ModelSpec, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        self.max_len = max_len
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(spec.layers):
            if layer.has_kv_cache:
                shape = (batch, layer.attention.num_kv_heads, max_len, spec.head_dim)
                self.k[i] = torch.zeros(shape, dtype=dtype, device=device)
                self.v[i] = torch.zeros(shape, dtype=dtype, device=device)
        #: (B, S) True where a slot holds a real (non-padding) token; position of each row's next token.
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.padded = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``/``v`` ``(B, kv, T, hd)`` at slots ``[start, start+T)``; return slots ``[0, start+T)``."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * w``, statistics in float32."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Linear(nn.Module):
    """A bias-free linear layer. FP8 weights are dequantized once; an FP8 layer fake-quantizes its input."""

    def __init__(self, weight: torch.Tensor, act_scale: torch.Tensor | None = None):
        super().__init__()
        self.weight = weight
        self.act_scale = act_scale

    @classmethod
    def load(cls, ctx: LoadContext, rule: TensorRule, layer: int | None) -> Linear:
        """The linear of ``rule``; FP8 weights need their weight and activation scaling factors."""
        name = rule.trt_name(layer)
        w = ctx.get(name)
        prefix = name.removesuffix("weight")
        scale = None
        if w.dtype == FP8_DTYPE:
            w = dequantize(w, ctx.get(prefix + WEIGHT_SCALE), ctx.dtype)
            if prefix + ACT_SCALE not in ctx.tensors:
                raise CheckpointError(f"tensor {name!r} is FP8 but {prefix + ACT_SCALE!r} is missing")
            scale = ctx.tensors[prefix + ACT_SCALE].to(device=ctx.device, dtype=torch.float32).reshape(())
        return cls(w.to(device=ctx.device, dtype=ctx.dtype).contiguous(), scale)

    @classmethod
    def fuse(cls, parts: list[Linear]) -> Linear | None:
        """One linear computing every part's output (concatenated), or None when their input scales differ."""
        scales = {None if p.act_scale is None else float(p.act_scale) for p in parts}
        if len(scales) != 1:
            return None
        return cls(torch.cat([p.weight for p in parts], dim=0), parts[0].act_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_scale is not None:
            x = fake_quant(x, self.act_scale)
        return F.linear(x, self.weight)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def _by_linear(rules: tuple[TensorRule, ...]) -> dict[str, TensorRule]:
    return {r.linear: r for r in rules if r.linear}


# ---- registries ------------------------------------------------------------------------------------------

class _SubBlock(nn.Module):
    """Base of a sub-block family: a direct subclass (the family) gets its own registry; its subclasses
    register themselves there under their kind (``class X(AttnBlock, kind=AttnKind.LINEAR)``)."""

    registry: ClassVar[dict]
    kind: ClassVar[Enum]

    def __init_subclass__(cls, kind: Enum | None = None, **kw):
        super().__init_subclass__(**kw)
        if kind is None:
            cls.registry = {}
            return
        if kind in cls.registry:
            raise TypeError(f"{cls.__mro__[1].__name__} kind {kind} registered twice")
        cls.kind = kind
        cls.registry[kind] = cls

    def __init__(self, ctx: LoadContext, index: int):
        super().__init__()
        self.index = index
        self.eps = ctx.spec.norm_epsilon


class AttnBlock(_SubBlock):
    """Base of the attention variants, registered under their :class:`AttnKind`."""

    registry: ClassVar[dict[AttnKind, type[AttnBlock]]]


class FfnBlock(_SubBlock):
    """Base of the FFN variants, registered under their :class:`FfnKind`."""

    registry: ClassVar[dict[FfnKind, type[FfnBlock]]]


# ---- attention variants ----------------------------------------------------------------------------------

class Attention(AttnBlock, kind=AttnKind.ATTENTION):
    """GQA self-attention with RoPE: ``h + dense(Attn(RoPE(q), RoPE(k), v))`` on ``RMSNorm_in(h)``."""

    def __init__(self, ctx: LoadContext, index: int):
        super().__init__(ctx, index)
        spec = ctx.spec
        rules = _by_linear(ATTENTION_RULES[AttnKind.ATTENTION])
        self.norm = ctx.tensor(INPUT_NORM.trt_name(index))
        self.qkv = Linear.load(ctx, rules["attention.qkv"], index)
        self.dense = Linear.load(ctx, rules["attention.dense"], index)
        self.nh, self.hd = spec.num_attention_heads, spec.head_dim
        self.kv = spec.layers[index].attention.num_kv_heads
        self.kv_scale = None
        if ctx.fp8_kv_cache:
            name = rules["attention.qkv"].trt_name(index).removesuffix("qkv.weight") + KV_SCALE
            self.kv_scale = ctx.get(name).to(device=ctx.device, dtype=torch.float32).reshape(())

    def forward(self, h: torch.Tensor, step: StepContext) -> torch.Tensor:
        b, t, _ = h.shape
        qkv = self.qkv(rms_norm(h, self.norm, self.eps))  # (B, T, (nh + 2 kv) hd)
        q, k, v = qkv.split((self.nh * self.hd, self.kv * self.hd, self.kv * self.hd), dim=-1)
        q = apply_rope(q.view(b, t, self.nh, self.hd).transpose(1, 2), step.cos, step.sin)  # (B, nh, T, hd)
        k = apply_rope(k.view(b, t, self.kv, self.hd).transpose(1, 2), step.cos, step.sin)  # (B, kv, T, hd)
        v = v.view(b, t, self.kv, self.hd).transpose(1, 2)  # (B, kv, T, hd)
        if self.kv_scale is not None:  # FP8 KV cache: attention reads what the cache stores
            k, v = fake_quant(k, self.kv_scale), fake_quant(v, self.kv_scale)
        if step.cache is not None:
            k, v = step.cache.update(self.index, step.start, k, v)  # (B, kv, S, hd)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask, is_causal=step.is_causal,
                                           enable_gqa=self.kv != self.nh)  # (B, nh, T, hd)
        return h + self.dense(o.transpose(1, 2).reshape(b, t, self.nh * self.hd))


class LinearAttention(AttnBlock, kind=AttnKind.LINEAR):
    """``h + W_lin RMSNorm_in(h)``: no KV cache, no RoPE."""

    def __init__(self, ctx: LoadContext, index: int):
        super().__init__(ctx, index)
        self.norm = ctx.tensor(INPUT_NORM.trt_name(index))
        self.proj = Linear.load(ctx, _by_linear(ATTENTION_RULES[AttnKind.LINEAR])["attention"], index)

    def forward(self, h: torch.Tensor, step: StepContext) -> torch.Tensor:
        return h + self.proj(rms_norm(h, self.norm, self.eps))


class NoOpAttention(AttnBlock, kind=AttnKind.NO_OP):
    """The sub-block is absent: the residual stream passes unchanged."""

    def forward(self, h: torch.Tensor, step: StepContext) -> torch.Tensor:
        return h


# ---- FFN variants ----------------------------------------------------------------------------------------

class SwiGLU(FfnBlock, kind=FfnKind.MLP):
    """``h + proj(silu(fc(n)) * gate(n))``, ``n = RMSNorm_post(h)``; fc (= HF gate_proj) and gate fused."""

    def __init__(self, ctx: LoadContext, index: int):
        super().__init__(ctx, index)
        rules = _by_linear(FFN_RULES[FfnKind.MLP])
        self.norm = ctx.tensor(POST_NORM.trt_name(index))
        fc, gate = Linear.load(ctx, rules["ffn.fc"], index), Linear.load(ctx, rules["ffn.gate"], index)
        self.fc_gate = Linear.fuse([fc, gate])  # None for FP8 with different input scales: keep them apart
        self.fc, self.gate = (None, None) if self.fc_gate is not None else (fc, gate)
        self.proj = Linear.load(ctx, rules["ffn.proj"], index)

    def forward(self, h: torch.Tensor, step: StepContext) -> torch.Tensor:
        n = rms_norm(h, self.norm, self.eps)
        if self.fc_gate is not None:
            g, u = self.fc_gate(n).chunk(2, dim=-1)  # (B, T, I) each
        else:
            g, u = self.fc(n), self.gate(n)
        return h + self.proj(F.silu(g) * u)


class LinearFfn(FfnBlock, kind=FfnKind.LINEAR):
    """``h + W_lin RMSNorm_post(h)``."""

    def __init__(self, ctx: LoadContext, index: int):
        super().__init__(ctx, index)
        self.norm = ctx.tensor(POST_NORM.trt_name(index))
        self.proj = Linear.load(ctx, _by_linear(FFN_RULES[FfnKind.LINEAR])["ffn"], index)

    def forward(self, h: torch.Tensor, step: StepContext) -> torch.Tensor:
        return h + self.proj(rms_norm(h, self.norm, self.eps))


class NoOpFfn(FfnBlock, kind=FfnKind.NO_OP):
    """The sub-block is absent: the residual stream passes unchanged."""

    def forward(self, h: torch.Tensor, step: StepContext) -> torch.Tensor:
        return h


#: Every kind the architecture model knows has a runtime class (checked at import, not halfway through a load).
_UNIMPLEMENTED = [k for k in AttnKind if k not in AttnBlock.registry] + [k for k in FfnKind if k not in FfnBlock.registry]
if _UNIMPLEMENTED:
    raise TypeError(f"reference runtime has no sub-block class for {_UNIMPLEMENTED}")


def build_layer(ctx: LoadContext, index: int, layer: LayerSpec) -> tuple[AttnBlock, FfnBlock]:
    """The two sub-blocks of decoder layer ``index`` (global numbering)."""
    return AttnBlock.registry[layer.attention.kind](ctx, index), FfnBlock.registry[layer.ffn.kind](ctx, index)
