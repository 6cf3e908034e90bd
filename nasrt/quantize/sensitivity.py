"""Per-linear FP8 sensitivity, measured layer by layer, as what ``--bf16_budget`` will get: how much the KL
divergence of the fully-FP8 model's next-token distribution from BF16's drops when only that scale group (weights +
input activations) is kept BF16. (Measuring each group FP8 *alone* ranks poorly on SmolLM2: the errors of the
quantized model interact, and keeping a group BF16 can even raise the loss.)

Bounded memory: blocks are read one at a time, as in calibration. Besides the BF16 and the fully-FP8 hidden states,
one copy per already-visited scale group (that group BF16, the rest FP8) is carried forward (a few calibration
sequences only), each run through every later block in FP8; after the last block all go through the final norm and
``lm_head`` and are compared with the BF16 logits. Cost: about ``units * layers / 2`` block forwards on the sample.
"""

from __future__ import annotations

import contextlib
import gc
import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nasrt.arch import AttnKind, FfnKind, ModelSpec
from nasrt.fp8 import dequantize, fake_quant, quantize, scale_from_amax
from nasrt.quantize.blocks import hf_layer_prefix, load_block, rotary
from nasrt.quantize.calibrate import AmaxTable
from nasrt.quantize.gptq import RoundedWeights
from nasrt.quantize.recipes import LinearUnit, linear_units
from nasrt.tensor_map import EMBEDDING, FINAL_NORM, lm_head_rule

log = logging.getLogger(__name__)

#: Perturbed copies run through a block (and through lm_head) per call.
STREAM_CHUNK = 16


def fp8_linears(block: torch.nn.Module, prefix: str, units: list[LinearUnit], table: AmaxTable,
                rounded: RoundedWeights | None = None) -> dict[str, list[tuple[torch.nn.Module, torch.Tensor,
                                                                               torch.Tensor]]]:
    """``{unit name: [(linear, FP8 weight dequantized, input scale)]}`` for ``units`` of ``block``, as the FP8
    checkpoint computes them: weights quantized with each unit's shared weight scale (or the GPTQ codes in
    ``rounded``). Computed once per block; :func:`fp8_units` swaps them in."""
    mods = dict(block.named_modules())
    out = {}
    for unit in units:
        w_scale = scale_from_amax(unit.amax(table, "weight"))
        a_scale = scale_from_amax(unit.amax(table, "input"))
        out[unit.name] = []
        for m in unit.hf_modules:
            sub = mods[m[len(prefix):]]
            if rounded is not None and m + ".weight" in rounded:
                rounded.check_scale(m + ".weight", w_scale)
                codes = rounded.get(m + ".weight").to(sub.weight.device)
            else:
                codes = quantize(sub.weight, w_scale)
            out[unit.name].append((sub, dequantize(codes, w_scale, sub.weight.dtype), a_scale))
    return out


@contextlib.contextmanager
def fp8_units(linears: dict, names: list[str]):
    """Make the units ``names`` (of :func:`fp8_linears`) compute in FP8: their FP8 weights swapped in, their
    inputs fake-quantized with their activation scales."""
    saved, handles = [], []
    try:
        for name in names:
            for sub, weight, a_scale in linears[name]:
                saved.append((sub, sub.weight))
                sub.weight = torch.nn.Parameter(weight, requires_grad=False)
                handles.append(sub.register_forward_pre_hook(
                    lambda _m, args, a=a_scale: (fake_quant(args[0], a),)))
        yield
    finally:
        for h in handles:
            h.remove()
        for sub, w in saved:
            sub.weight = w


@torch.no_grad()
def measure_sensitivity(reader, spec: ModelSpec, batches: list[torch.Tensor], table: AmaxTable,
                        dtype: torch.dtype, device: torch.device | str = "cpu", progress: bool = True,
                        rounded: RoundedWeights | None = None) -> dict[str, float]:
    """``{unit name: KL gain when kept BF16}`` for every FP8 scale group of the model, on ``batches`` (keep them
    small); FP8 weights as the export writes them (``rounded``: GPTQ codes)."""
    device = torch.device(device)
    emb = reader.get(EMBEDDING.hf_names()[0]).to(dtype)
    base = [F.embedding(ids, emb).to(device) for ids in batches]
    del emb
    rope = rotary(spec).to(device)
    pos = {}

    def pe(h: torch.Tensor):
        s = h.shape[1]
        if s not in pos:
            pos[s] = rope(h, torch.arange(s, device=h.device).unsqueeze(0))
        return pos[s]

    names: list[str] = []
    fp8 = list(base)  # the fully-FP8 model's hidden states
    pert: list[torch.Tensor | None] = [None] * len(base)  # per sample: [copies, T, H], one per name
    for i in tqdm(range(spec.num_layers), desc="sensitivity", unit="block", disable=not progress):
        layer = spec.layers[i]
        if layer.attention.kind is AttnKind.NO_OP and layer.ffn.kind is FfnKind.NO_OP:
            continue
        block = load_block(reader, spec, i, dtype).to(device)
        prefix = hf_layer_prefix(spec, i)
        units = [u for u in linear_units(spec, i) if all(m in table for m in u.hf_modules)]  # others stay BF16
        linears = fp8_linears(block, prefix, units, table, rounded)
        with fp8_units(linears, list(linears)):
            for k, p in enumerate(pert):
                if p is not None:  # every earlier copy, through this block in FP8 (one batch)
                    pert[k] = torch.cat([block(c, pe(c)) for c in p.split(STREAM_CHUNK)])
            fp8_out = [block(h, pe(h)) for h in fp8]
        for name in linears:  # that unit BF16, the rest of the block FP8
            with fp8_units(linears, [n for n in linears if n != name]):
                outs = [block(h, pe(h)) for h in fp8]
            names.append(name)
            pert = [o if p is None else torch.cat([p, o]) for p, o in zip(pert, outs, strict=True)]
        fp8 = fp8_out
        base = [block(h, pe(h)) for h in base]
        del block, linears
        gc.collect()
    norm = reader.get(FINAL_NORM.hf_names()[0]).to(dtype).to(device)
    head = reader.get(lm_head_rule(spec).hf_names()[0]).to(dtype).to(device)

    def logits(h: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + spec.norm_epsilon)
        return F.linear(norm * hf.to(dtype), head)

    def kl(ref: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        logq = F.log_softmax(logits(h).float(), dim=-1)  # [c, T, V]
        return (ref.exp() * (ref - logq)).sum(-1).mean(-1)  # [c]

    total = torch.zeros(len(names), dtype=torch.float64)
    for h, q, p in zip(base, fp8, pert, strict=True):
        if p is None:
            continue
        ref = F.log_softmax(logits(h).float(), dim=-1)  # [1, T, V]
        full = float(kl(ref, q)[0])
        for start in range(0, p.shape[0], STREAM_CHUNK):
            gain = full - kl(ref, p[start:start + STREAM_CHUNK])
            total[start:start + len(gain)] += gain.double().cpu()
    return {n: float(total[j]) / len(base) for j, n in enumerate(names)}


def choose_bf16_units(sensitivity: dict[str, float], sizes: dict[str, int], budget: float) -> list[str]:
    """The most sensitive units whose parameters fit in ``budget`` x all linear parameters (greedy, most
    sensitive first; a unit that does not fit is skipped and smaller ones may still fill the budget; a unit whose
    gain is not positive is never kept BF16)."""
    total = sum(sizes.values())
    left = budget * total
    chosen = []
    for name in sorted(sensitivity, key=lambda n: (-sensitivity[n], n)):
        if sensitivity[name] > 0 and sizes[name] <= left:
            chosen.append(name)
            left -= sizes[name]
    return chosen
