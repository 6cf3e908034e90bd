"""Weights of a candidate block: the parent layer's tensors, transformed (KV heads merged, FFN channels kept) or
replaced by fitted ones, under the HF DeciLM names of the candidate's variant; and the PyTorch block that runs it."""

from __future__ import annotations

from dataclasses import replace

import torch

from nasrt.arch import AttnKind, FfnKind, LayerSpec, ModelSpec
from nasrt.derive.fit import keep_channels, merge_kv_heads, narrow_ffn
from nasrt.derive.library import Candidate
from nasrt.quantize.blocks import DeciBlock, hf_layer_prefix, layer_hf_names
from nasrt.st_io import SafetensorsReader
from nasrt.tensor_map import ATTENTION_RULES, FFN_RULES

#: Key of the FFN channel ranking in a layer's fitted tensors.
ORDER_KEY = "ffn/order"


def fitted_key(cand: Candidate, rel: str) -> str:
    """Key of a fitted / distilled tensor of ``cand`` in a layer's fitted tensors."""
    return f"{cand.sub}/{cand.name}/{rel}"


def sub_names(spec: ModelSpec, layer_idx: int, cand: Candidate) -> list[str]:
    """Layer-relative HF names of ``cand``'s tensors (from the tensor table)."""
    rules = ATTENTION_RULES[cand.attn.kind] if cand.sub == "attention" else FFN_RULES[cand.ffn.kind]
    prefix = hf_layer_prefix(spec, layer_idx)
    return [n[len(prefix):] for rule in rules for n in rule.hf_names(layer_idx)]


def parent_state(model_dir, spec: ModelSpec, layer_idx: int) -> dict[str, torch.Tensor]:
    """The parent layer's tensors in float32, read through a reader of their own (nothing stays mapped)."""
    reader = SafetensorsReader(model_dir)
    prefix = hf_layer_prefix(spec, layer_idx)
    out = {n[len(prefix):]: reader.get(n).to(torch.float32, copy=True) for n in layer_hf_names(spec, layer_idx)}
    reader.close()
    return out


def candidate_tensors(spec: ModelSpec, layer_idx: int, cand: Candidate, parent: dict[str, torch.Tensor],
                      fitted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``cand``'s sub-block tensors (layer-relative names): fitted / distilled ones first, else from the parent."""
    out = {}
    keep = None
    if cand.sub == "ffn" and cand.ffn.kind is FfnKind.MLP and not cand.is_parent:
        keep = keep_channels(fitted[ORDER_KEY], cand.ffn.intermediate_size)
        gate, up, down = narrow_ffn(parent["mlp.gate_proj.weight"], parent["mlp.up_proj.weight"],
                                    parent["mlp.down_proj.weight"], keep)
        narrowed = {"mlp.gate_proj.weight": gate, "mlp.up_proj.weight": up, "mlp.down_proj.weight": down}
    for rel in sub_names(spec, layer_idx, cand):
        key = fitted_key(cand, rel)
        if key in fitted:
            out[rel] = fitted[key]
        elif cand.is_parent or rel.endswith("layernorm.weight"):
            out[rel] = parent[rel]
        elif cand.sub == "attention" and cand.attn.kind is AttnKind.ATTENTION:
            w = parent[rel]
            out[rel] = merge_kv_heads(w, cand.attn.num_kv_heads, spec.head_dim) if rel.endswith(
                ("k_proj.weight", "v_proj.weight")) else w
        elif keep is not None:
            out[rel] = narrowed[rel]
        else:
            raise KeyError(f"layer {layer_idx}: no fitted tensor {key!r}")
    return out


def layer_tensors(spec: ModelSpec, layer_idx: int, attn: Candidate, ffn: Candidate,
                  parent: dict[str, torch.Tensor], fitted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**candidate_tensors(spec, layer_idx, attn, parent, fitted),
            **candidate_tensors(spec, layer_idx, ffn, parent, fitted)}


def with_layer(spec: ModelSpec, layer_idx: int, layer: LayerSpec) -> ModelSpec:
    return replace(spec, layers=tuple(layer if k == layer_idx else la for k, la in enumerate(spec.layers)))


def build_block(spec: ModelSpec, layer_idx: int, layer: LayerSpec, state: dict[str, torch.Tensor]) -> DeciBlock:
    """A float32 :class:`DeciBlock` of variant ``layer`` holding ``state`` (layer-relative HF names)."""
    with torch.device("meta"):
        block = DeciBlock(with_layer(spec, layer_idx, layer), layer_idx)
    block.load_state_dict(state, strict=True, assign=True)
    return block.eval()
