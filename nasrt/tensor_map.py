"""HF <-> TensorRT-LLM tensor names for ``DeciLMForCausalLM``: one declarative table, read by every stage.

Each :class:`TensorRule` holds the TensorRT-LLM name template (``{i}`` = layer index local to the pipeline
stage), the HF source templates (``{l}`` = global layer index; several sources are concatenated along dim 0),
the expected HF shapes as symbols, the tensor-parallel split, and the TensorRT-LLM module name of the
FP8-quantizable linear the weight belongs to.

Shape symbols: ``H`` hidden size, ``V`` vocab size, ``Q`` = heads*head_dim, ``KV`` = layer KV heads*head_dim,
``I`` = layer FFN intermediate size.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from nasrt.arch import AttnKind, FfnKind, LayerSpec, ModelSpec


class Split(str, Enum):
    """How a tensor is cut across tensor-parallel ranks."""

    REPLICATE = "replicate"  # every rank holds the whole tensor
    COLUMN = "column"  # split dim 0 (output features); ColumnLinear
    ROW = "row"  # split dim 1 (input features); RowLinear
    QKV = "qkv"  # q, k, v each split by heads; K/V heads repeated first when tp > kv
    VOCAB = "vocab"  # rows zero-padded to a multiple of tp, then split dim 0 (lm_head)
    EMBEDDING = "embedding"  # replicated, or VOCAB / ROW with --use_parallel_embedding dim 0 / 1


@dataclass(frozen=True)
class TensorRule:
    """One TensorRT-LLM tensor and where it comes from."""

    trt: str
    hf: tuple[tuple[str, tuple[str, ...]], ...]  # (HF name template, shape symbols) per source
    split: Split
    linear: str | None = None  # FP8: the module that carries weights/activation scaling factors
    note: str = ""

    def trt_name(self, local_layer: int | None = None) -> str:
        return self.trt.format(i=local_layer)

    def hf_names(self, layer: int | None = None) -> list[str]:
        return [t.format(l=layer) for t, _ in self.hf]


_L = "transformer.layers.{i}."
_H = "model.layers.{l}."

EMBEDDING = TensorRule("transformer.vocab_embedding.weight", (("model.embed_tokens.weight", ("V", "H")),),
                       Split.EMBEDDING)
FINAL_NORM = TensorRule("transformer.ln_f.weight", (("model.norm.weight", ("H",)),), Split.REPLICATE)
LM_HEAD = TensorRule("lm_head.weight", (("lm_head.weight", ("V", "H")),), Split.VOCAB, linear="lm_head",
                     note="tied models read model.embed_tokens.weight instead")
LM_HEAD_TIED = TensorRule("lm_head.weight", (("model.embed_tokens.weight", ("V", "H")),), Split.VOCAB,
                          linear="lm_head", note="tie_word_embeddings: TensorRT-LLM still needs an lm_head")

INPUT_NORM = TensorRule(_L + "input_layernorm.weight", ((_H + "input_layernorm.weight", ("H",)),),
                        Split.REPLICATE)
POST_NORM = TensorRule(_L + "post_layernorm.weight", ((_H + "post_attention_layernorm.weight", ("H",)),),
                       Split.REPLICATE)

ATTENTION_RULES: dict[AttnKind, tuple[TensorRule, ...]] = {
    AttnKind.ATTENTION: (
        INPUT_NORM,
        TensorRule(_L + "attention.qkv.weight",
                   ((_H + "self_attn.q_proj.weight", ("Q", "H")),
                    (_H + "self_attn.k_proj.weight", ("KV", "H")),
                    (_H + "self_attn.v_proj.weight", ("KV", "H"))),
                   Split.QKV, linear="attention.qkv", note="fused q|k|v rows"),
        TensorRule(_L + "attention.dense.weight", ((_H + "self_attn.o_proj.weight", ("H", "Q")),),
                   Split.ROW, linear="attention.dense"),
    ),
    AttnKind.LINEAR: (
        INPUT_NORM,
        TensorRule(_L + "attention.weight", ((_H + "self_attn.linear_attn.weight", ("H", "H")),),
                   Split.COLUMN, linear="attention", note="ColumnLinear, output gathered"),
    ),
    AttnKind.NO_OP: (),
}

FFN_RULES: dict[FfnKind, tuple[TensorRule, ...]] = {
    FfnKind.MLP: (
        POST_NORM,
        TensorRule(_L + "ffn.fc.weight", ((_H + "mlp.gate_proj.weight", ("I", "H")),), Split.COLUMN,
                   linear="ffn.fc", note="fc is the silu branch = HF gate_proj (naming trap)"),
        TensorRule(_L + "ffn.gate.weight", ((_H + "mlp.up_proj.weight", ("I", "H")),), Split.COLUMN,
                   linear="ffn.gate", note="gate is the linear branch = HF up_proj (naming trap)"),
        TensorRule(_L + "ffn.proj.weight", ((_H + "mlp.down_proj.weight", ("H", "I")),), Split.ROW,
                   linear="ffn.proj"),
    ),
    FfnKind.LINEAR: (
        POST_NORM,
        TensorRule(_L + "ffn.weight", ((_H + "mlp.linear_mlp.weight", ("H", "H")),), Split.COLUMN,
                   linear="ffn", note="ColumnLinear, output gathered"),
    ),
    FfnKind.NO_OP: (),
}

#: FP8 scale tensors per quantized linear, and the per-attention-layer KV cache scale.
WEIGHT_SCALE = "weights_scaling_factor"
ACT_SCALE = "activation_scaling_factor"
KV_SCALE = "kv_cache_scaling_factor"
KV_SCALE_MODULE = "attention"
#: Linears that stay in the checkpoint dtype unless explicitly asked for (``--quantize_lm_head``).
UNQUANTIZED_BY_DEFAULT = ("lm_head",)
#: TensorRT-LLM linears that may run as one GEMM, so they share one FP8 weight and activation scale (the max); the
#: fused q|k|v rows of ``attention.qkv`` share theirs by construction.
FP8_FUSED_GROUPS = (("ffn.fc", "ffn.gate"),)
#: Unified HF FP8 checkpoint (ModelOpt ``export_hf_checkpoint``): scale tensor suffix beside an HF linear's
#: ``.weight`` -> the TensorRT-LLM scale of the linear it becomes (q/k/v and gate/up groups take the max).
HF_FP8_SCALES = {"weight_scale": WEIGHT_SCALE, "input_scale": ACT_SCALE}
#: Unified HF FP8 KV-cache scales of attention layer ``{l}``; TensorRT-LLM's ``kv_cache_scaling_factor`` is their max.
HF_KV_SCALES = ("model.layers.{l}.self_attn.k_proj.k_scale", "model.layers.{l}.self_attn.v_proj.v_scale")


def layer_rules(layer: LayerSpec) -> tuple[TensorRule, ...]:
    """The rules of one decoder layer, attention first."""
    return ATTENTION_RULES[layer.attention.kind] + FFN_RULES[layer.ffn.kind]


def lm_head_rule(spec: ModelSpec) -> TensorRule:
    return LM_HEAD_TIED if spec.tie_word_embeddings else LM_HEAD


def symbol_sizes(spec: ModelSpec, layer: LayerSpec | None) -> dict[str, int]:
    sizes = {"H": spec.hidden_size, "V": spec.vocab_size, "Q": spec.q_size}
    if layer is not None:
        if layer.attention.num_kv_heads:
            sizes["KV"] = layer.attention.num_kv_heads * spec.head_dim
        if layer.ffn.intermediate_size:
            sizes["I"] = layer.ffn.intermediate_size
    return sizes


def hf_shapes(rule: TensorRule, spec: ModelSpec, layer: LayerSpec | None) -> list[tuple[int, ...]]:
    """Expected HF shape of each source of ``rule``."""
    sizes = symbol_sizes(spec, layer)
    return [tuple(sizes[s] for s in shape) for _, shape in rule.hf]


def expected_hf_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a checkpoint of ``spec`` must hold, with its shape."""
    out: dict[str, tuple[int, ...]] = {}
    globals_ = [EMBEDDING, FINAL_NORM] + ([] if spec.tie_word_embeddings else [LM_HEAD])
    for rule in globals_:
        out.update(zip(rule.hf_names(), hf_shapes(rule, spec, None), strict=True))
    for idx, layer in enumerate(spec.layers):
        for rule in layer_rules(layer):
            out.update(zip(rule.hf_names(idx), hf_shapes(rule, spec, layer), strict=True))
    return out
