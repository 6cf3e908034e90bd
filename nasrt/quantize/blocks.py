"""PyTorch DeciLM decoder blocks built from a :class:`~nasrt.arch.LayerSpec` and HF tensors.

Modules carry HF names (``self_attn.q_proj``, ``self_attn.linear_attn``, ``mlp.gate_proj``, ``mlp.linear_mlp``),
so ModelOpt's wildcards (``*weight_quantizer``, ``*input_quantizer``, ``*[kv]_bmm_quantizer``) match them. Real
attention and SwiGLU MLPs reuse transformers' Llama modules (one per-layer config), so a block computes exactly
what ``LlamaDecoderLayer`` computes; ModelOpt's HF attention wrapper provides the K/V quantizers.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from nasrt.arch import AttnKind, FfnKind, LayerSpec, ModelSpec
from nasrt.tensor_map import EMBEDDING, FINAL_NORM, INPUT_NORM, layer_rules, lm_head_rule


def llama_config(spec: ModelSpec, layer: LayerSpec | None = None) -> LlamaConfig:
    """A transformers ``LlamaConfig`` with ``layer``'s KV heads and FFN width (global values otherwise)."""
    kv = (layer.attention.num_kv_heads if layer and layer.attention.num_kv_heads else spec.num_attention_heads)
    inter = (layer.ffn.intermediate_size if layer and layer.ffn.intermediate_size else 4 * spec.hidden_size)
    rope: dict = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling is not None:
        rope = {**spec.rope_scaling.to_dict(), "rope_theta": spec.rope_theta}
    cfg = LlamaConfig(hidden_size=spec.hidden_size, num_attention_heads=spec.num_attention_heads,
                      num_key_value_heads=kv, intermediate_size=inter, num_hidden_layers=spec.num_layers,
                      vocab_size=spec.vocab_size, rms_norm_eps=spec.norm_epsilon, hidden_act=spec.hidden_act,
                      max_position_embeddings=spec.max_position_embeddings, rope_parameters=rope,
                      attention_bias=False, mlp_bias=False, tie_word_embeddings=spec.tie_word_embeddings)
    cfg._attn_implementation = "sdpa"
    return cfg


class LinearAttention(nn.Module):
    """``replace_with_linear`` attention: one H x H matmul (HF ``self_attn.linear_attn``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear_attn = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, **_) -> tuple[torch.Tensor, None]:
        return self.linear_attn(hidden_states), None


class LinearMLP(nn.Module):
    """``replace_with_linear`` FFN: one H x H matmul (HF ``mlp.linear_mlp``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear_mlp = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(hidden_states)


class DeciBlock(nn.Module):
    """One DeciLM decoder layer; a no-op sub-block has neither module nor norm and passes the residual on."""

    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        layer = spec.layers[layer_idx]
        self.layer_idx = layer_idx
        h, eps = spec.hidden_size, spec.norm_epsilon
        self.input_layernorm: nn.Module | None = None
        self.self_attn: nn.Module | None = None
        self.post_attention_layernorm: nn.Module | None = None
        self.mlp: nn.Module | None = None
        if layer.attention.kind is not AttnKind.NO_OP:
            self.input_layernorm = LlamaRMSNorm(h, eps=eps)
            self.self_attn = (LlamaAttention(llama_config(spec, layer), layer_idx)
                              if layer.attention.kind is AttnKind.ATTENTION else LinearAttention(h))
        if layer.ffn.kind is not FfnKind.NO_OP:
            self.post_attention_layernorm = LlamaRMSNorm(h, eps=eps)
            self.mlp = LlamaMLP(llama_config(spec, layer)) if layer.ffn.kind is FfnKind.MLP else LinearMLP(h)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if self.self_attn is not None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                              position_embeddings=position_embeddings, **kwargs)
            hidden_states = residual + hidden_states
        if self.mlp is not None:
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states)
            hidden_states = residual + hidden_states
        return hidden_states


def hf_layer_prefix(spec: ModelSpec, layer_idx: int) -> str:
    """``model.layers.N.``: the HF module path of layer ``N`` (from the tensor table's input-norm rule)."""
    return INPUT_NORM.hf_names(layer_idx)[0].rsplit("input_layernorm.", 1)[0]


def layer_hf_names(spec: ModelSpec, layer_idx: int) -> list[str]:
    """Every HF tensor name of layer ``layer_idx`` (from the tensor table)."""
    return [n for rule in layer_rules(spec.layers[layer_idx]) for n in rule.hf_names(layer_idx)]


def load_block(reader, spec: ModelSpec, layer_idx: int, dtype: torch.dtype) -> DeciBlock:
    """Build layer ``layer_idx`` and fill it from ``reader`` (HF names) in ``dtype``; only this layer is read."""
    with torch.device("meta"):
        block = DeciBlock(spec, layer_idx)
    prefix = hf_layer_prefix(spec, layer_idx)
    state = {n[len(prefix):]: reader.get(n).to(dtype) for n in layer_hf_names(spec, layer_idx)}
    block.load_state_dict(state, strict=True, assign=True)
    return block.eval()


def rotary(spec: ModelSpec) -> LlamaRotaryEmbedding:
    """The RoPE table generator (llama3 scaling included), as the HF model builds it."""
    return LlamaRotaryEmbedding(llama_config(spec))


class DeciCausalLM(nn.Module):
    """The whole model from nasrt blocks (for ``--whole_model`` on architectures transformers lacks).

    Module names follow the HF checkpoint (``model.layers.N...``, ``model.norm``, ``lm_head``).
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.model.layers = nn.ModuleList(DeciBlock(spec, i) for i in range(spec.num_layers))
        self.model.norm = LlamaRMSNorm(spec.hidden_size, eps=spec.norm_epsilon)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary_emb = rotary(spec)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        position_embeddings = self.rotary_emb(h, pos)
        for block in self.model.layers:
            h = block(h, position_embeddings)
        return self.lm_head(self.model.norm(h))


def load_whole(reader, spec: ModelSpec, dtype: torch.dtype) -> DeciCausalLM:
    """The whole :class:`DeciCausalLM` in memory, filled from ``reader``."""
    with torch.device("meta"):
        model = DeciCausalLM(spec)
    state = {}
    for i in range(spec.num_layers):
        state.update({n: reader.get(n).to(dtype) for n in layer_hf_names(spec, i)})
    state["model.embed_tokens.weight"] = reader.get(EMBEDDING.hf_names()[0]).to(dtype)
    state["model.norm.weight"] = reader.get(FINAL_NORM.hf_names()[0]).to(dtype)
    state["lm_head.weight"] = reader.get(lm_head_rule(spec).hf_names()[0]).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or [m for m in missing if "rotary_emb" not in m]:
        raise RuntimeError(f"DeciCausalLM state mismatch: missing {missing}, unexpected {unexpected}")
    model.rotary_emb = rotary(spec)  # buffers were created on meta
    return model.eval()
