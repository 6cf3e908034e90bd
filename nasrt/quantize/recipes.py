"""FP8 recipes: how weight and activation amax values (and the weights' FP8 codes) are chosen once a block has been
calibrated.

ModelOpt's default (``max``) takes ``max |W|`` and ``max |x|`` and rounds each weight to the nearest FP8 value. The
searched recipes pick, per *scale group*, the weight amax (a multiplier of the group max) that minimises the FP8
rounding error of every weight in the group, and may pick activation amax values from a histogram (ModelOpt's
``HistogramCalibrator``, ``percentile``). ``gptq`` keeps ModelOpt's scales and chooses the FP8 codes by GPTQ
(:mod:`nasrt.quantize.gptq`): on this per-tensor grid the scale barely matters away from clipping (FP8's relative
grid repeats every factor 2), while which neighbour each weight is rounded to does.

Scale groups are TensorRT-LLM's sharing rules: q/k/v are one fused GEMM with one weight scale, and ``trtllm-build``
fuses ``fc``/``gate`` under one scale (their max); so the search runs over the whole group and every member gets
the same searched amax: what is exported is what was optimised (both exports then quantize with that one scale).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nasrt.arch import ModelSpec
from nasrt.errors import ConfigError
from nasrt.fp8 import dequantize, quantize, scale_from_amax
from nasrt.quantize.gptq import InputHessian, RoundedWeights, block_error, gptq_pieces
from nasrt.tensor_map import layer_rules

log = logging.getLogger(__name__)

#: TensorRT-LLM linears that share one weight scale (``trtllm-build`` fuses them); q/k/v are one rule already.
SHARED_LINEARS = (("ffn.fc", "ffn.gate"),)
#: Weight amax candidates, multipliers of the group's max |W| (FP8's relative grid repeats every factor 2): a coarse
#: pass over 2^(k/4) in [2^-1/2, 2], then 2^(j/16), |j| <= 3, around the best coarse one.
COARSE_MULTIPLIERS = tuple(2.0 ** (k / 4) for k in range(-2, 5))
FINE_STEPS = tuple(j / 16 for j in (-3, -2, -1, 1, 2, 3))
#: Elements per weight the error is estimated on: its largest |w| (which decide clipping) plus an evenly strided
#: sample of the rest, scaled up to the full count (deterministic).
SEARCH_TOP = 1024
#: ``omse``: calibration input tokens kept per scale group, and weight rows per member the error is computed on.
SEARCH_TOKENS = 256
SEARCH_ROWS = 256
SEARCH_SAMPLE = 1 << 16
HIST_BINS = 2048


@dataclass(frozen=True)
class Recipe:
    """One ``--recipe``: the weight-scale method, the activation-scale method (and its parameter)."""

    name: str
    weight: str  # "max" | "mse" (squared error) | "hmse" (weighted by E[x_j^2]) | "omse" (output error)
    activation: str  # "max" | "percentile"
    percentile: float = 99.99
    description: str = ""
    rounding: str = "nearest"  # "nearest" | "gptq" (error-compensating, nasrt.quantize.gptq)

    @property
    def needs_stats(self) -> bool:
        return self.weight in ("hmse", "omse") or self.activation != "max" or self.gptq

    @property
    def gptq(self) -> bool:
        return self.rounding == "gptq"


#: The ``--recipe`` table. ``max`` is ModelOpt's FP8_DEFAULT_CFG arithmetic.
RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("max", "max", "max", description="ModelOpt default: weight amax = max|W|, input amax = max|x|"),
    Recipe("pct", "max", "percentile", 99.99, description="weight amax = max|W|; input amax = 99.99th "
           "percentile of |x| (ModelOpt HistogramCalibrator; clips the massive activations: measured +267 %)"),
    Recipe("mse", "mse", "max", description="weight amax searched per TensorRT-LLM scale group (min squared "
           "FP8 error), input amax = max|x|"),
    Recipe("hmse", "hmse", "max", description="weight amax searched per scale group, error weighted by the "
           "calibration inputs' per-channel E[x^2] (diagonal local Hessian), input amax = max|x|"),
    Recipe("omse", "omse", "max", description="weight amax searched per scale group minimising the output error "
           "||X (W - Q(W))^T||^2 on sampled calibration inputs X (full local Hessian: catches correlated "
           "rounding errors), input amax = max|x|"),
    Recipe("gptq", "max", "max", rounding="gptq", description="weight amax = max|W| per TensorRT-LLM scale group; "
           "weights rounded to FP8 by GPTQ (each column's rounding error compensated in the columns not yet "
           "rounded, weighted by the calibration inputs' X^T X), input amax = max|x|"),
)}
#: Measured on SmolLM2 (quantize.py's default calibration, 512 passages / 46k tokens, W+A+KV; bench/fp8_quality.py,
#: two 12,000-character held-out texts): max +3.96 % / +3.63 %, gptq +3.07 % / +2.38 %; averaged over four rounding
#: realisations (activation and KV scales x 2^(k/4)) max +4.59 % / +3.64 %, gptq +3.66 % / +2.60 %, gptq lower in all
#: 8 pairs; weights only max +1.70 % / +0.79 %, gptq +0.40 % / +0.20 %. With 32 passages (2,666 tokens): max +4.98 %
#: / +4.51 %, gptq +3.44 % / +3.37 %; earlier (6000 characters): hmse +6.86 %, omse +4.23 %, pct +267 % (clipping
#: the massive activations). ModelOpt 0.47's histogram "mse" for FP8 fails (``ScaledE4M3Function.forward() missing
#: ... 'M'``), so it is not offered.
DEFAULT_RECIPE = "gptq"


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"--recipe {name!r} is not one of {list(RECIPES)}") from None


@dataclass(frozen=True)
class LinearUnit:
    """TensorRT-LLM linears of one layer that share a weight scale (and are kept BF16 or FP8 together)."""

    layer: int
    linears: tuple[str, ...]  # TensorRT-LLM linear names, e.g. ("ffn.fc", "ffn.gate")
    hf_modules: tuple[str, ...]  # the HF modules behind them (one input: q/k/v, or gate/up)

    @property
    def name(self) -> str:
        return f"transformer.layers.{self.layer}." + "+".join(self.linears)

    def amax(self, table: dict, kind: str) -> torch.Tensor:
        """The unit's shared amax of ``kind`` ("weight" | "input"): the max over its members, as the exports share
        it (:func:`nasrt.quantize.export.fp8_scales`)."""
        return torch.stack([table[m][kind] for m in self.hf_modules]).max()

    def trt_modules(self) -> list[str]:
        """TensorRT-LLM module names (what ``exclude_modules`` patterns match)."""
        return [f"transformer.layers.{self.layer}.{lin}" for lin in self.linears]


def linear_units(spec: ModelSpec, layer_idx: int) -> list[LinearUnit]:
    """The scale groups of one layer, attention first."""
    rules = {r.linear: r for r in layer_rules(spec.layers[layer_idx]) if r.linear}
    units, done = [], set()
    for lin in rules:
        if lin in done:
            continue
        group = next((g for g in SHARED_LINEARS if lin in g), (lin,))
        members = tuple(g for g in group if g in rules)
        done.update(members)
        hf = tuple(n.rsplit(".weight", 1)[0] for m in members for n in rules[m].hf_names(layer_idx))
        units.append(LinearUnit(layer_idx, members, hf))
    return units


def all_units(spec: ModelSpec) -> list[LinearUnit]:
    return [u for i in range(spec.num_layers) for u in linear_units(spec, i)]


# ---- activation statistics ----------------------------------------------------------------------------------

class InputStats:
    """Per-unit input statistics: per-channel sum of x^2 (float64) and ModelOpt's |x| histogram."""

    def __init__(self, histogram: bool, keep_tokens: int = 0, hessian: bool = False):
        self.sq: torch.Tensor | None = None
        self.wants_hessian = hessian
        self.hessian: InputHessian | None = None  # sum x x^T (whole, or diagonal blocks for wide inputs)
        self.count = 0
        self.keep_tokens = keep_tokens
        self.tokens: list[torch.Tensor] = []
        self.hist = None
        if histogram:
            from modelopt.torch.quantization.calib.histogram import HistogramCalibrator

            self.hist = HistogramCalibrator(num_bits=(4, 3), axis=None, num_bins=HIST_BINS)

    def collect(self, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        s = x2.pow(2).sum(0).double().cpu()
        self.sq = s if self.sq is None else self.sq + s
        self.count += x2.shape[0]
        if self.wants_hessian:
            if self.hessian is None:
                self.hessian = InputHessian(x2.shape[1])
            self.hessian.add(x2)
        kept = sum(t.shape[0] for t in self.tokens)
        if kept < self.keep_tokens:
            self.tokens.append(x2[::4][:self.keep_tokens - kept].cpu().clone())  # spread over more text
        if self.hist is not None:
            self.hist.collect(x2)

    def channel_weight(self) -> torch.Tensor:
        """E[x_j^2] per input channel (float32)."""
        return (self.sq / max(self.count, 1)).float()

    def amax(self, recipe: Recipe) -> torch.Tensor:
        a = self.hist.compute_amax("percentile", percentile=recipe.percentile)
        return torch.as_tensor(float(a), dtype=torch.float32)


def attach_input_stats(module: torch.nn.Module, prefix: str, units: list[LinearUnit],
                       recipe: Recipe) -> tuple[dict[str, InputStats], list]:
    """Forward pre-hooks on the first HF module of each unit (the unit's members read the same input), collecting
    what ``recipe`` needs."""
    stats: dict[str, InputStats] = {}
    handles = []
    mods = dict(module.named_modules())
    for u in units:
        sub = mods.get(u.hf_modules[0][len(prefix):])
        if sub is None:
            continue
        st = stats[u.name] = InputStats(recipe.activation != "max",
                                        SEARCH_TOKENS if recipe.weight == "omse" else 0, recipe.gptq)
        handles.append(sub.register_forward_pre_hook(lambda _m, args, st=st: st.collect(args[0])))
    return stats, handles


# ---- weight search ------------------------------------------------------------------------------------------

def _sample(w: torch.Tensor, cw: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor | None, float]]:
    """``[(values, channel weights, multiplicity)]``: the top-|w| elements once, a strided sample of the rest."""
    flat = w.reshape(-1).float()
    if flat.numel() <= SEARCH_TOP + SEARCH_SAMPLE:
        return [(flat, None if cw is None else cw.repeat(w.shape[0]), 1.0)]
    top = flat.abs().topk(SEARCH_TOP).indices
    step = flat.numel() // SEARCH_SAMPLE
    idx = torch.arange(0, step * SEARCH_SAMPLE, step)
    mult = (flat.numel() - SEARCH_TOP) / SEARCH_SAMPLE
    cols = w.shape[-1]
    return [(flat[top], None if cw is None else cw[top % cols], 1.0),
            (flat[idx], None if cw is None else cw[idx % cols], mult)]


def _search_multiplier(base: torch.Tensor, error: Callable[[torch.Tensor], float]) -> tuple[torch.Tensor, float]:
    """``(base * m, m)`` for the multiplier ``m`` minimising ``error(scale)``: the coarse grid, then fine steps
    around its best; each multiplier is evaluated once, and ties go to the earlier (smaller) candidate."""
    errors: dict[float, float] = {}

    def err(m: float) -> float:
        if m not in errors:
            errors[m] = error(scale_from_amax(base * m))
        return errors[m]

    def pick(cands) -> float:
        best = None
        for m in cands:
            if best is None or err(m) < err(best) * (1 - 1e-12):
                best = m
        return best

    coarse = pick(COARSE_MULTIPLIERS)
    best = pick([coarse] + [coarse * 2.0 ** f for f in FINE_STEPS])
    return (base * best).to(torch.float32), best


@torch.no_grad()
def search_weight_amax(weights: list[torch.Tensor],
                       channel_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """The amax (``m * max|W|`` over the group) minimising ``sum (W - deq(q(W)))^2 [* E[x_j^2]]`` over the group.

    Returns ``(amax, m)``. Ties go to the smaller multiplier; the grid includes 1.0 (ModelOpt's max).
    """
    base = torch.stack([w.abs().max().float() for w in weights]).max()
    cw = None if channel_weight is None else channel_weight.float().reshape(-1)
    samples = [part for w in weights for part in _sample(w, cw)]

    def err(s: torch.Tensor) -> float:
        total = 0.0
        for x, c, k in samples:
            d = (dequantize(quantize(x, s), s) - x).pow(2)
            total += k * float((d * c).sum() if c is not None else d.sum())
        return total

    return _search_multiplier(base, err)


@torch.no_grad()
def search_weight_amax_output(weights: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Like :func:`search_weight_amax`, minimising ``sum ||x (W - deq(q(W)))^T||^2`` over the group (``x``:
    ``[tokens, in]`` sampled inputs). Rows are sampled (strided, plus the row holding the group max)."""
    base = torch.stack([w.abs().max().float() for w in weights]).max()
    x = x.float()
    parts = []
    for w in weights:
        w = w.float()
        step = max(1, w.shape[0] // SEARCH_ROWS)
        rows = list(range(0, w.shape[0], step))
        top = int(w.abs().amax(1).argmax())
        parts.append((w[rows], w.shape[0] / len(rows)))
        parts.append((w[top:top + 1], 1.0))

    def err(s: torch.Tensor) -> float:
        return sum(k * float((x @ (dequantize(quantize(w, s), s) - w).T).pow(2).sum()) for w, k in parts)

    return _search_multiplier(base, err)


def apply_recipe(table: dict, module: torch.nn.Module, prefix: str, units: list[LinearUnit],
                 stats: dict[str, InputStats], recipe: Recipe, rounded: RoundedWeights | None = None) -> dict:
    """Rewrite ``table`` (HF module -> amax dict) for one calibrated block: weight amax searched per unit (one
    value for every member), input amax from the recipe's method; with GPTQ rounding, each member's FP8 codes
    (under the unit's shared scale, exactly as the exporters compute it) go to ``rounded``. ``max`` leaves
    ModelOpt's values untouched.

    Returns ``{unit name: {"weight_multiplier": m, "input_vs_max": r, "gptq_error_vs_nearest": e}}`` for the
    record.
    """
    if recipe.gptq and rounded is None:
        raise ValueError(f"recipe {recipe.name!r} rounds weights by GPTQ: a RoundedWeights store is needed")
    mods = dict(module.named_modules())
    record, weights = {}, {}
    for u in units:
        if any(m not in table for m in u.hf_modules):
            continue
        rec = {}
        ws = weights[u.name] = [mods[m[len(prefix):]].weight.detach() for m in u.hf_modules]
        if recipe.weight != "max":
            if recipe.weight == "omse":
                amax, rec["weight_multiplier"] = search_weight_amax_output(ws, torch.cat(stats[u.name].tokens))
            else:
                cw = stats[u.name].channel_weight() if recipe.weight == "hmse" else None
                amax, rec["weight_multiplier"] = search_weight_amax(ws, cw)
            for m in u.hf_modules:
                table[m]["weight"] = amax.reshape(()).clone()
        if recipe.activation != "max":
            act = stats[u.name].amax(recipe)
            rec["input_vs_max"] = float(act) / float(u.amax(table, "input"))
            for m in u.hf_modules:
                table[m]["input"] = act.reshape(()).clone()
        record[u.name] = rec
    if recipe.gptq:  # widest input first: its Hessian is freed before the others are rounded (bounded memory)
        for u in sorted((u for u in units if u.name in record), key=lambda u: -stats[u.name].hessian.size):
            record[u.name]["gptq_error_vs_nearest"] = _round_unit(u, weights[u.name], table, stats[u.name].hessian,
                                                                  rounded)
            stats[u.name].hessian = None
    return record


def _round_unit(unit: LinearUnit, weights: list[torch.Tensor], table: dict, hessian: InputHessian,
                rounded: RoundedWeights) -> float:
    """GPTQ codes of every member under the unit's shared weight scale (one input, one Hessian, one scale: rounded
    together), handed to ``rounded`` a block of columns at a time; returns the output error relative to
    round-to-nearest."""
    scale = scale_from_amax(unit.amax(table, "weight"))
    blocks = {a: blk for a, _, blk in hessian.spans()}
    err = nearest = 0.0
    for i, a, b, codes in gptq_pieces(weights, hessian, scale):
        w = weights[i][:, a:b]
        err += block_error(w, codes, scale, blocks[a])
        nearest += block_error(w, None, scale, blocks[a])
        rounded.add(unit.hf_modules[i] + ".weight", codes, scale, column=a)
        del codes
    return err / nearest if nearest > 0 else 1.0
