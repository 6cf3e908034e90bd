"""Declarative schema of every ``config.json`` field nasrt reads (HF and TensorRT-LLM), checked once at parse time.

:func:`nasrt.arch.from_hf_config` and :func:`nasrt.arch.from_trtllm_config` call :func:`check_hf_config` /
:func:`check_trtllm_config` before reading anything, so every stage (convert, quantize, inspect, plan, run, ...)
inherits the same checks: JSON types (a bool is a real ``true``/``false``, an int is an integer, not ``64.9`` or
``"64"``), ranges, finiteness (no NaN / Infinity), and the shape of nested objects (``block_configs`` entries are
objects with object sub-blocks). Fields nasrt does not read are ignored. Each error names the file and the key.

The upper bounds are sanity bounds far above any released model (Llama-3.1-Nemotron-Ultra-253B: hidden 16384,
162 layers, vocab 128256); they keep nonsense values from turning into unbounded work.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from nasrt.errors import ConfigError


class Kind(str, Enum):
    """JSON value kinds a field may have."""

    INT = "an integer"
    NUMBER = "a finite number"
    BOOL = "a JSON boolean (true / false)"
    STR = "a string"
    OBJECT = "a JSON object"
    INT_OR_INTS = "an integer or a non-empty list of integers"
    INTS = "a list of integers"
    OBJECTS = "a list of JSON objects"
    ANY = "any JSON value"


@dataclass(frozen=True)
class Field:
    """One field: its kind, whether it must be present (non-null), and its range (numbers / list items)."""

    kind: Kind
    required: bool = False
    lo: float | None = None  # inclusive lower bound
    hi: float | None = None  # inclusive upper bound
    lo_open: bool = False  # the lower bound is exclusive (``> lo``)
    choices: tuple[Any, ...] | None = None
    fields: Mapping[str, Field] | None = None  # OBJECT / OBJECTS: the fields of the nested object(s)


#: Sanity bounds (see the module docstring).
MAX_HIDDEN = 1 << 17
MAX_HEADS = 1 << 12
MAX_LAYERS = 4096
MAX_VOCAB = 1 << 22
MAX_WIDTH = 1 << 21
MAX_POSITIONS = 1 << 26
MAX_FFN_MULT = 64.0

_POS = {"lo": 0.0, "lo_open": True}

ROPE_FIELDS: dict[str, Field] = {
    "rope_type": Field(Kind.STR),
    "type": Field(Kind.STR),
    "rope_theta": Field(Kind.NUMBER, **_POS),
    "factor": Field(Kind.NUMBER, **_POS),
    "low_freq_factor": Field(Kind.NUMBER, **_POS),
    "high_freq_factor": Field(Kind.NUMBER, **_POS),
    "original_max_position_embeddings": Field(Kind.INT, lo=1, hi=MAX_POSITIONS),
}

#: HF ``block_configs[i].attention`` / ``.ffn`` fields whose type nasrt checks (unsupported variants are refused
#: by :func:`nasrt.arch.hf_block_to_layer`).
HF_ATTENTION_FIELDS: dict[str, Field] = {
    "n_heads_in_group": Field(Kind.INT, lo=1, hi=MAX_HEADS),
    "no_op": Field(Kind.BOOL),
    "replace_with_linear": Field(Kind.BOOL),
    "unshifted_sink": Field(Kind.BOOL),
    "use_prefill_window_in_sink_attention": Field(Kind.BOOL),
}
HF_FFN_FIELDS: dict[str, Field] = {
    "ffn_mult": Field(Kind.NUMBER, lo=0.0, lo_open=True, hi=MAX_FFN_MULT),
    "no_op": Field(Kind.BOOL),
    "replace_with_linear": Field(Kind.BOOL),
}
HF_BLOCK_FIELDS: dict[str, dict[str, Field]] = {"attention": HF_ATTENTION_FIELDS, "ffn": HF_FFN_FIELDS}

#: Model types nasrt reads (``nemotron-nas`` needs ``block_configs``; ``deci`` ``num_key_value_heads_per_layer``).
HF_MODEL_TYPES = ("nemotron-nas", "deci", "llama")

#: Every top-level HF ``config.json`` field nasrt reads.
HF_FIELDS: dict[str, Field] = {
    "model_type": Field(Kind.STR),
    "hidden_size": Field(Kind.INT, required=True, lo=1, hi=MAX_HIDDEN),
    "num_attention_heads": Field(Kind.INT, required=True, lo=1, hi=MAX_HEADS),
    "num_hidden_layers": Field(Kind.INT, required=True, lo=1, hi=MAX_LAYERS),
    "vocab_size": Field(Kind.INT, required=True, lo=1, hi=MAX_VOCAB),
    "head_dim": Field(Kind.INT, lo=1, hi=MAX_HIDDEN),
    "intermediate_size": Field(Kind.INT, lo=1, hi=MAX_WIDTH),
    "num_key_value_heads": Field(Kind.INT, lo=1, hi=MAX_HEADS),
    "num_key_value_heads_per_layer": Field(Kind.INTS, lo=1, hi=MAX_HEADS),
    "block_configs": Field(Kind.OBJECTS),  # entries: check_blocks
    "attention_bias": Field(Kind.BOOL),
    "mlp_bias": Field(Kind.BOOL),
    "hidden_act": Field(Kind.STR),
    "rms_norm_eps": Field(Kind.NUMBER, lo=0.0, lo_open=True, hi=1.0),
    "rope_theta": Field(Kind.NUMBER, **_POS),
    "rope_parameters": Field(Kind.OBJECT, fields=ROPE_FIELDS),
    "rope_scaling": Field(Kind.OBJECT, fields=ROPE_FIELDS),
    "max_position_embeddings": Field(Kind.INT, lo=1, hi=MAX_POSITIONS),
    "tie_word_embeddings": Field(Kind.BOOL),
    "torch_dtype": Field(Kind.STR),
    "dtype": Field(Kind.STR),
    "bos_token_id": Field(Kind.INT_OR_INTS, lo=0, hi=MAX_VOCAB),
    "eos_token_id": Field(Kind.INT_OR_INTS, lo=0, hi=MAX_VOCAB),
}

#: TensorRT-LLM ``layer_configs[i]`` sub-blocks.
TRT_LAYER_FIELDS: dict[str, Field] = {
    "attention": Field(Kind.OBJECT, required=True, fields={
        "impl": Field(Kind.STR, choices=("attention", "linear", "no_op")),
        "num_key_value_heads": Field(Kind.INT, lo=1, hi=MAX_HEADS)}),
    "ffn": Field(Kind.OBJECT, required=True, fields={
        "impl": Field(Kind.STR, choices=("mlp", "linear", "no_op")),
        "intermediate_size": Field(Kind.INT, lo=1, hi=MAX_WIDTH)}),
}

#: Every TensorRT-LLM checkpoint ``config.json`` field nasrt reads.
TRTLLM_FIELDS: dict[str, Field] = {
    "architecture": Field(Kind.STR),
    "dtype": Field(Kind.STR),
    "hidden_size": Field(Kind.INT, required=True, lo=1, hi=MAX_HIDDEN),
    "num_attention_heads": Field(Kind.INT, required=True, lo=1, hi=MAX_HEADS),
    "num_hidden_layers": Field(Kind.INT, required=True, lo=1, hi=MAX_LAYERS),
    "vocab_size": Field(Kind.INT, required=True, lo=1, hi=MAX_VOCAB),
    "num_key_value_heads": Field(Kind.INT, lo=1, hi=MAX_HEADS),
    "intermediate_size": Field(Kind.INT, lo=1, hi=MAX_WIDTH),
    "layer_configs": Field(Kind.OBJECTS, fields=TRT_LAYER_FIELDS),
    "block_configs": Field(Kind.OBJECTS),  # entries: check_blocks
    "hidden_act": Field(Kind.STR),
    "norm_epsilon": Field(Kind.NUMBER, lo=0.0, lo_open=True, hi=1.0),
    "rotary_base": Field(Kind.NUMBER, **_POS),
    "rotary_scaling": Field(Kind.OBJECT, fields=ROPE_FIELDS),
    "max_position_embeddings": Field(Kind.INT, lo=1, hi=MAX_POSITIONS),
    "tie_word_embeddings": Field(Kind.BOOL),
    "use_parallel_embedding": Field(Kind.BOOL),
    "embedding_sharding_dim": Field(Kind.INT, choices=(0, 1)),
    "bos_token_id": Field(Kind.INT_OR_INTS, lo=0, hi=MAX_VOCAB),
    "eos_token_id": Field(Kind.INT_OR_INTS, lo=0, hi=MAX_VOCAB),
    "mapping": Field(Kind.OBJECT, fields={
        "world_size": Field(Kind.INT, lo=1, hi=1 << 16),
        "tp_size": Field(Kind.INT, lo=1, hi=1 << 12),
        "pp_size": Field(Kind.INT, lo=1, hi=MAX_LAYERS)}),
    "quantization": Field(Kind.OBJECT, fields={
        "quant_algo": Field(Kind.STR),
        "kv_cache_quant_algo": Field(Kind.STR),
        "exclude_modules": Field(Kind.ANY)}),
}

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 60, 60, 3, 6, 4


def show(value: Any) -> str:
    """A short repr for error messages (bounded in length and depth, whatever the value)."""
    return _REPR.repr(value)


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass; 64.0 / "64" are not integers


def _is_number(v: Any) -> bool:
    return type(v) in (int, float)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bounds(f: Field) -> str:
    lo = "" if f.lo is None else (f"> {_num(f.lo)}" if f.lo_open else f">= {_num(f.lo)}")
    hi = "" if f.hi is None else f"<= {_num(f.hi)}"
    return " and ".join(x for x in (lo, hi) if x)


def _describe(f: Field) -> str:
    text = f.kind.value
    if f.choices is not None:
        return f"one of {list(f.choices)}"
    bounds = _bounds(f)
    if bounds and f.kind in (Kind.INT_OR_INTS, Kind.INTS):
        return f"{text} (each {bounds})"
    return f"{text} {bounds}".strip()


def _in_range(f: Field, v: float) -> bool:
    if f.lo is not None and (v <= f.lo if f.lo_open else v < f.lo):
        return False
    return f.hi is None or v <= f.hi


def _scalar_ok(f: Field, kind: Kind, v: Any) -> bool:
    if kind is Kind.INT:
        return _is_int(v) and _in_range(f, v)
    if kind is Kind.NUMBER:
        return _is_number(v) and math.isfinite(v) and _in_range(f, v)
    if kind is Kind.BOOL:
        return type(v) is bool
    if kind is Kind.STR:
        return isinstance(v, str)
    return True


def check_value(value: Any, f: Field, key: str, where: str) -> None:
    """Check one non-null value against ``f``; nested objects are checked recursively."""
    bad = ConfigError(f"{where}: {key} = {show(value)} must be {_describe(f)}")
    kind = f.kind
    if kind is Kind.ANY:
        return
    if f.choices is not None and (value not in f.choices or type(value) is bool):
        raise bad
    if kind in (Kind.INT, Kind.NUMBER, Kind.BOOL, Kind.STR):
        if not _scalar_ok(f, kind, value):
            raise bad
    elif kind is Kind.INT_OR_INTS:
        items = value if isinstance(value, list) else [value]
        if not items or not all(_scalar_ok(f, Kind.INT, v) for v in items):
            raise bad
    elif kind is Kind.INTS:
        if not isinstance(value, list) or not all(_scalar_ok(f, Kind.INT, v) for v in value):
            raise bad
    elif kind is Kind.OBJECT:
        if not isinstance(value, dict):
            raise bad
        check_fields(value, f.fields or {}, where, f"{key}.")
    elif kind is Kind.OBJECTS:
        if not isinstance(value, list):
            raise bad
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ConfigError(f"{where}: {key}[{i}] = {show(item)} must be a JSON object")
            check_fields(item, f.fields or {}, where, f"{key}[{i}].")


def check_fields(obj: dict[str, Any], fields: Mapping[str, Field], where: str, prefix: str = "") -> None:
    """Check every field of ``fields`` present in ``obj``; null counts as absent (an error when required)."""
    for key, f in fields.items():
        value = obj.get(key)
        if value is None:
            if f.required:
                raise ConfigError(f"{where}: required key {prefix + key!r} is missing or null")
            continue
        check_value(value, f, prefix + key, where)


def check_blocks(blocks: list[dict[str, Any]], where: str) -> None:
    """HF ``block_configs``: each present sub-block is an object whose known fields have the right types
    (missing sub-blocks and unsupported variants are reported by :func:`nasrt.arch.hf_block_to_layer`)."""
    for i, block in enumerate(blocks):
        for sub, fields in HF_BLOCK_FIELDS.items():
            value = block.get(sub)
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: layer {i} {sub}: block_configs[{i}].{sub} = {show(value)} must be "
                                  "a JSON object")
            check_fields(value, fields, f"{where}: layer {i} {sub}")


def check_hf_config(cfg: Any, where: str = "config.json") -> None:
    """Validate an HF ``config.json`` (every field nasrt reads) and its model type."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: must hold a JSON object, got {type(cfg).__name__}")
    check_fields(cfg, HF_FIELDS, where)
    check_blocks(cfg.get("block_configs") or [], where)
    model_type = cfg.get("model_type")
    if model_type not in (*HF_MODEL_TYPES, None):
        raise ConfigError(f"{where}: model_type {model_type!r} is not supported "
                          f"(expected one of {', '.join(map(repr, HF_MODEL_TYPES))})")
    if model_type == "nemotron-nas" and cfg.get("block_configs") is None:
        raise ConfigError(f"{where}: model_type 'nemotron-nas' needs 'block_configs' (missing or null)")
    if model_type is None and cfg.get("block_configs") is not None:
        raise ConfigError(f"{where}: 'block_configs' without a model_type; expected model_type 'nemotron-nas'")


def check_trtllm_config(cfg: Any, where: str = "config.json") -> None:
    """Validate a TensorRT-LLM checkpoint ``config.json`` (every field nasrt reads)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: must hold a JSON object, got {type(cfg).__name__}")
    check_fields(cfg, TRTLLM_FIELDS, where)
    check_blocks(cfg.get("block_configs") or [], where)
