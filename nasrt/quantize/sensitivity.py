"""Per-linear FP8 sensitivity, measured layer by layer: the KL divergence of the model's final next-token
distribution when only that scale group (weights + input activations) is FP8 and everything else stays BF16.

Bounded memory: blocks are read one at a time, as in calibration. Besides the unquantized hidden states, one
perturbed copy per already-visited scale group is carried forward (a few calibration sequences only), each run
through every later block unquantized; after the last block all copies go through the final norm and ``lm_head``
and are compared with the unquantized logits. Cost: about ``units * layers / 2`` block forwards on the sample.
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
from nasrt.quantize.recipes import LinearUnit, linear_units
from nasrt.tensor_map import EMBEDDING, FINAL_NORM, lm_head_rule

log = logging.getLogger(__name__)

#: Perturbed copies run through a block (and through lm_head) per call.
STREAM_CHUNK = 16


@contextlib.contextmanager
def fp8_unit(block: torch.nn.Module, prefix: str, unit: LinearUnit, table: AmaxTable):
    """Make ``unit``'s linears in ``block`` compute as the FP8 checkpoint would: weights quantized with the unit's
    (shared) weight scale, inputs fake-quantized with its activation scale."""
    mods = dict(block.named_modules())
    subs = [mods[m[len(prefix):]] for m in unit.hf_modules]
    w_scale = scale_from_amax(torch.stack([table[m]["weight"] for m in unit.hf_modules]).max())
    a_scale = scale_from_amax(torch.stack([table[m]["input"] for m in unit.hf_modules]).max())
    saved = [s.weight for s in subs]
    handles = []
    try:
        for s in subs:
            s.weight = torch.nn.Parameter(dequantize(quantize(s.weight, w_scale), w_scale, s.weight.dtype),
                                          requires_grad=False)
            handles.append(s.register_forward_pre_hook(lambda _m, args: (fake_quant(args[0], a_scale),)))
        yield
    finally:
        for h in handles:
            h.remove()
        for s, w in zip(subs, saved, strict=True):
            s.weight = w


@torch.no_grad()
def measure_sensitivity(reader, spec: ModelSpec, batches: list[torch.Tensor], table: AmaxTable,
                        dtype: torch.dtype, device: torch.device | str = "cpu",
                        progress: bool = True) -> dict[str, float]:
    """``{unit name: KL}`` for every FP8 scale group of the model, on ``batches`` (keep them small)."""
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
    pert: list[torch.Tensor | None] = [None] * len(base)  # per sample: [perturbed copies, T, H], one per name
    for i in tqdm(range(spec.num_layers), desc="sensitivity", unit="block", disable=not progress):
        layer = spec.layers[i]
        if layer.attention.kind is AttnKind.NO_OP and layer.ffn.kind is FfnKind.NO_OP:
            continue
        block = load_block(reader, spec, i, dtype).to(device)
        prefix = hf_layer_prefix(spec, i)
        for k, p in enumerate(pert):
            if p is not None:  # every earlier perturbation, run through this block unquantized (one batch)
                pert[k] = torch.cat([block(c, pe(c)) for c in p.split(STREAM_CHUNK)])
        for unit in linear_units(spec, i):
            if any(m not in table for m in unit.hf_modules):
                continue  # kept unquantized
            with fp8_unit(block, prefix, unit, table):
                outs = [block(h, pe(h)) for h in base]
            names.append(unit.name)
            pert = [o if p is None else torch.cat([p, o]) for p, o in zip(pert, outs, strict=True)]
        base = [block(h, pe(h)) for h in base]
        del block
        gc.collect()
    norm = reader.get(FINAL_NORM.hf_names()[0]).to(dtype).to(device)
    head = reader.get(lm_head_rule(spec).hf_names()[0]).to(dtype).to(device)

    def logits(h: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + spec.norm_epsilon)
        return F.linear(norm * hf.to(dtype), head)

    total = torch.zeros(len(names), dtype=torch.float64)
    for h, p in zip(base, pert, strict=True):
        if p is None:
            continue
        ref = F.log_softmax(logits(h).float(), dim=-1)  # [1, T, V]
        for start in range(0, p.shape[0], STREAM_CHUNK):
            logq = F.log_softmax(logits(p[start:start + STREAM_CHUNK]).float(), dim=-1)  # [c, T, V]
            kl = (ref.exp() * (ref - logq)).sum(-1).mean(-1)  # [c]
            total[start:start + len(kl)] += kl.double().cpu()
    return {n: float(total[j]) / len(base) for j, n in enumerate(names)}


def choose_bf16_units(sensitivity: dict[str, float], sizes: dict[str, int], budget: float) -> list[str]:
    """The most sensitive units whose parameters fit in ``budget`` x all linear parameters (greedy, most
    sensitive first; a unit that does not fit is skipped and smaller ones may still fill the budget)."""
    total = sum(sizes.values())
    left = budget * total
    chosen = []
    for name in sorted(sensitivity, key=lambda n: (-sensitivity[n], n)):
        if sizes[name] <= left:
            chosen.append(name)
            left -= sizes[name]
    return chosen
