"""The block library of one parent layer: every cheaper attention and FFN variant ``nasrt derive`` may choose, and
what each costs (parameters, KV heads, a modelled decode-step time).

Attention: GQA with fewer KV heads (a divisor of the parent's), one linear layer, no-op. FFN: narrower SwiGLU
widths that a DeciLM ``ffn_mult`` expresses exactly, one linear layer, no-op. The parent's own sub-block is always
candidate 0. Attention and FFN variants are scored and chosen separately (the Puzzle paper's decoupled library).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from nasrt.arch import (
    AttnKind,
    AttnSpec,
    FfnKind,
    FfnSpec,
    LayerSpec,
    ModelSpec,
    ffn_mult_to_intermediate_size,
)
from nasrt.errors import ConfigError

#: Default FFN narrowing ratios of the parent width (Puzzle: ~87 / 75 / 50 / 25 / 10 %).
DEFAULT_FFN_RATIOS = (0.87, 0.75, 0.5, 0.25, 0.1)
#: DeciLM rounds every FFN width up to a multiple of this (decilm-architecture §3).
FFN_WIDTH_QUANTUM = 256
#: The modelled accelerator of the ``time`` cost: H100 SXM dense BF16 peak FLOP/s and HBM bytes/s.
TIME_MODEL = {"device": "H100-SXM (modelled roofline)", "flops": 989e12, "bytes_per_s": 3.35e12, "weight_bytes": 2,
              "kv_bytes": 2}
SUBBLOCKS = ("attention", "ffn")


@dataclass(frozen=True)
class Candidate:
    """One variant of one sub-block (``sub`` = "attention" or "ffn") of a parent layer."""

    sub: str
    name: str
    attn: AttnSpec | None = None
    ffn: FfnSpec | None = None
    is_parent: bool = False

    def layer(self, parent: LayerSpec) -> LayerSpec:
        """The parent layer with this candidate swapped in."""
        return replace(parent, attention=self.attn) if self.sub == "attention" else replace(parent, ffn=self.ffn)


@dataclass(frozen=True)
class Costs:
    params: int
    kv_heads: int
    time_s: float


@dataclass(frozen=True)
class Target:
    """The decode step the ``time`` cost models: ``batch`` sequences of ``seq`` tokens of context."""

    batch: int = 8
    seq: int = 4096


def attn_name(a: AttnSpec) -> str:
    return f"kv{a.num_kv_heads}" if a.kind is AttnKind.ATTENTION else a.kind.value


def ffn_name(f: FfnSpec) -> str:
    return f"mlp{f.intermediate_size}" if f.kind is FfnKind.MLP else f.kind.value


def ffn_mult_for(width: int, hidden: int) -> float:
    """An ``ffn_mult`` (6 decimals, as the HF config code rounds) whose DeciLM width is exactly ``width``."""
    base = round(3 * width / (2 * hidden), 6)
    for delta in (0, 1, -1, 2, -2, 3, -3):
        mult = round(base + delta * 1e-6, 6)
        if mult > 0 and ffn_mult_to_intermediate_size(mult, hidden) == width:
            return mult
    raise ConfigError(f"FFN width {width} is not expressible as a DeciLM ffn_mult at hidden_size {hidden} "
                      f"(widths are multiples of {FFN_WIDTH_QUANTUM})")


def width_quantum(tp: int) -> int:
    """FFN widths must be multiples of 256 (DeciLM) and split evenly over ``tp`` ranks."""
    return FFN_WIDTH_QUANTUM * tp // math.gcd(FFN_WIDTH_QUANTUM, tp)


def ffn_widths(parent_width: int, ratios: tuple[float, ...], tp: int = 1) -> list[int]:
    """Narrower widths: each ratio of ``parent_width`` rounded to the nearest allowed width (descending, unique,
    the parent's own width excluded)."""
    q = width_quantum(tp)
    out = set()
    for r in ratios:
        if not 0 < r < 1:
            raise ConfigError(f"--ffn_ratios {r}: every ratio must lie strictly between 0 and 1")
        w = max(q, int(math.floor(r * parent_width / q + 0.5)) * q)
        if w < parent_width:
            out.add(w)
    return sorted(out, reverse=True)


def _kv_ok(kv: int, tp: int) -> bool:
    return kv % tp == 0 or tp % kv == 0


def attention_candidates(spec: ModelSpec, layer_idx: int, no_linear: bool = False, tp: int = 1) -> list[Candidate]:
    """The parent's attention first, then fewer KV heads, linear, no-op."""
    parent = spec.layers[layer_idx].attention
    out = [Candidate("attention", attn_name(parent), attn=parent, is_parent=True)]
    if parent.kind is AttnKind.ATTENTION:
        kv = parent.num_kv_heads
        for k in sorted((d for d in range(1, kv) if kv % d == 0), reverse=True):
            if _kv_ok(k, tp):
                out.append(Candidate("attention", f"kv{k}", attn=AttnSpec(AttnKind.ATTENTION, k)))
        if not no_linear:
            out.append(Candidate("attention", "linear", attn=AttnSpec(AttnKind.LINEAR)))
    if parent.kind is not AttnKind.NO_OP:
        out.append(Candidate("attention", "no_op", attn=AttnSpec(AttnKind.NO_OP)))
    return out


def ffn_candidates(spec: ModelSpec, layer_idx: int, ratios: tuple[float, ...] = DEFAULT_FFN_RATIOS,
                   no_linear: bool = False, tp: int = 1) -> list[Candidate]:
    """The parent's FFN first, then narrower widths, linear, no-op."""
    parent = spec.layers[layer_idx].ffn
    out = [Candidate("ffn", ffn_name(parent), ffn=parent, is_parent=True)]
    if parent.kind is FfnKind.MLP:
        for w in ffn_widths(parent.intermediate_size, ratios, tp):
            out.append(Candidate("ffn", f"mlp{w}", ffn=FfnSpec(FfnKind.MLP, w)))
        if not no_linear:
            out.append(Candidate("ffn", "linear", ffn=FfnSpec(FfnKind.LINEAR)))
    if parent.kind is not FfnKind.NO_OP:
        out.append(Candidate("ffn", "no_op", ffn=FfnSpec(FfnKind.NO_OP)))
    return out


def layer_library(spec: ModelSpec, layer_idx: int, ratios: tuple[float, ...] = DEFAULT_FFN_RATIOS,
                  no_linear: bool = False, tp: int = 1) -> dict[str, list[Candidate]]:
    return {"attention": attention_candidates(spec, layer_idx, no_linear, tp),
            "ffn": ffn_candidates(spec, layer_idx, ratios, no_linear, tp)}


def _sub_spec(spec: ModelSpec, layer: LayerSpec) -> ModelSpec:
    return replace(spec, layers=(layer,))


def _time(spec: ModelSpec, params: int, kv: int, attention: bool, target: Target) -> float:
    m = TIME_MODEL
    flops = 2 * target.batch * params
    nbytes = params * m["weight_bytes"]
    if attention:
        flops += 4 * target.batch * target.seq * spec.q_size
        nbytes += target.batch * target.seq * 2 * kv * spec.head_dim * m["kv_bytes"]
    return max(flops / m["flops"], nbytes / m["bytes_per_s"])


def candidate_costs(spec: ModelSpec, layer_idx: int, cand: Candidate, target: Target = Target()) -> Costs:
    """Parameters, KV heads and modelled decode-step time of ``cand``'s sub-block alone."""
    empty = LayerSpec(AttnSpec(AttnKind.NO_OP), FfnSpec(FfnKind.NO_OP))
    layer = cand.layer(empty)
    params = _sub_spec(spec, layer).layer_params(0)
    kv = cand.attn.num_kv_heads if cand.sub == "attention" and cand.attn.kind is AttnKind.ATTENTION else 0
    return Costs(params, kv, _time(spec, params, kv, layer.has_kv_cache, target))


def global_costs(spec: ModelSpec, target: Target = Target()) -> Costs:
    """Embedding, final norm and lm_head: the part of every cost no choice changes."""
    params = spec.num_params - sum(spec.layer_params(i) for i in range(spec.num_layers))
    head = spec.vocab_size * spec.hidden_size
    return Costs(params, 0, _time(spec, head, 0, False, target))


def spec_costs(spec: ModelSpec, target: Target = Target()) -> Costs:
    """Total costs of a whole model (recomputed from its :class:`ModelSpec`)."""
    g = global_costs(spec, target)
    t = g.time_s
    for i, la in enumerate(spec.layers):
        for c in (Candidate("attention", attn_name(la.attention), attn=la.attention),
                  Candidate("ffn", ffn_name(la.ffn), ffn=la.ffn)):
            t += candidate_costs(spec, i, c, target).time_s
    return Costs(spec.num_params, sum(spec.kv_heads_per_layer), t)
