"""The per-layer architecture model: the one source of truth every nasrt stage reads.

A :class:`ModelSpec` is built by exactly one parser per input form
(HF ``nemotron-nas`` ``block_configs``, HF ``deci`` ``num_key_value_heads_per_layer``, plain HF Llama,
TensorRT-LLM ``layer_configs``). Derived facts (KV heads per layer, parameter counts, KV bytes per token)
are properties, never stored copies.
"""

from __future__ import annotations

import json
import math
import os
import stat
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from nasrt.config_schema import MAX_WIDTH, check_hf_config, check_trtllm_config, show
from nasrt.errors import ConfigError

#: Attention sub-block keys in HF ``block_configs`` that nasrt understands; anything else must be null/false.
_HF_ATTN_KEYS = {"n_heads_in_group", "no_op", "replace_with_linear", "sparsify", "window_length",
                 "num_sink_tokens", "use_prefill_window_in_sink_attention", "unshifted_sink"}
_HF_FFN_KEYS = {"ffn_mult", "no_op", "replace_with_linear", "sparsify"}
_UNSUPPORTED_IF_SET = ("sparsify", "window_length", "num_sink_tokens",
                       "use_prefill_window_in_sink_attention", "unshifted_sink")


class AttnKind(str, Enum):
    """Attention sub-block implementation (TensorRT-LLM ``AttentionImplementation`` values)."""

    ATTENTION = "attention"
    LINEAR = "linear"
    NO_OP = "no_op"


class FfnKind(str, Enum):
    """FFN sub-block implementation (TensorRT-LLM ``FFNImplementation`` values)."""

    MLP = "mlp"
    LINEAR = "linear"
    NO_OP = "no_op"


@dataclass(frozen=True)
class AttnSpec:
    """One layer's attention: kind and, for real attention only, its KV head count."""

    kind: AttnKind
    num_kv_heads: int | None = None


@dataclass(frozen=True)
class FfnSpec:
    """One layer's FFN: kind and, for a SwiGLU MLP only, its intermediate size."""

    kind: FfnKind
    intermediate_size: int | None = None


@dataclass(frozen=True)
class LayerSpec:
    attention: AttnSpec
    ffn: FfnSpec

    @property
    def has_kv_cache(self) -> bool:
        return self.attention.kind is AttnKind.ATTENTION

    def to_trtllm(self) -> dict[str, Any]:
        """The TensorRT-LLM ``layer_configs`` entry."""
        return {
            "attention": {"impl": self.attention.kind.value, "num_key_value_heads": self.attention.num_kv_heads},
            "ffn": {"impl": self.ffn.kind.value, "intermediate_size": self.ffn.intermediate_size},
        }


@dataclass(frozen=True)
class Llama3Rope:
    """llama3 RoPE frequency scaling parameters."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int

    def to_dict(self) -> dict[str, Any]:
        return {"factor": self.factor, "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings,
                "rope_type": "llama3"}


@dataclass(frozen=True)
class ModelSpec:
    """Global dimensions plus one :class:`LayerSpec` per layer."""

    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    layers: tuple[LayerSpec, ...]
    norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Llama3Rope | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # ---- derived facts -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_heads_per_layer(self) -> list[int]:
        """KV heads of attention-impl layers only, in layer order (TensorRT-LLM ``num_kv_heads_per_layer``)."""
        return [la.attention.num_kv_heads for la in self.layers if la.has_kv_cache]  # type: ignore[misc]

    @property
    def layer_types(self) -> list[str]:
        return [la.attention.kind.value for la in self.layers]

    def layer_params(self, idx: int) -> int:
        """Parameters of layer ``idx`` (norms included)."""
        h, la = self.hidden_size, self.layers[idx]
        n = 0
        if la.attention.kind is AttnKind.ATTENTION:
            n += 2 * h * self.q_size + 2 * h * la.attention.num_kv_heads * self.head_dim + h
        elif la.attention.kind is AttnKind.LINEAR:
            n += h * h + h
        if la.ffn.kind is FfnKind.MLP:
            n += 3 * h * la.ffn.intermediate_size + h
        elif la.ffn.kind is FfnKind.LINEAR:
            n += h * h + h
        return n

    @property
    def num_params(self) -> int:
        """Parameters as the HF model counts them (a tied lm_head counted once)."""
        glob = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size
        return glob + sum(self.layer_params(i) for i in range(self.num_layers))

    def kv_bytes_per_token(self, bytes_per_elem: float, tp: int = 1) -> float:
        """K+V cache bytes per token on one TP rank (K/V heads duplicated when tp > kv)."""
        heads = sum(math.ceil(kv / tp) for kv in self.kv_heads_per_layer)
        return heads * 2 * self.head_dim * bytes_per_elem

    # ---- serialisation -------------------------------------------------------------------------------
    def rope_dict(self) -> dict[str, Any] | None:
        return self.rope_scaling.to_dict() if self.rope_scaling else None

    def to_trtllm_config(self, dtype: str, mapping: dict[str, Any], quantization: dict[str, Any] | None = None,
                         use_parallel_embedding: bool = False, embedding_sharding_dim: int = 0) -> dict[str, Any]:
        """The TensorRT-LLM ``config.json`` for ``DeciLMForCausalLM``.

        Top-level ``num_key_value_heads`` / ``intermediate_size`` are only fallbacks (``layer_configs`` carries
        every layer's value). They are written as TensorRT-LLM's own converter writes them: the value HF states
        when every layer is of that kind and agrees (Llama, DeciLM-7B's FFN), else ``PretrainedConfig``'s defaults
        ``num_attention_heads`` / ``4 * hidden_size`` (Nemotron-NAS: its HF config class nulls both).
        """
        kvs = {la.attention.num_kv_heads if la.has_kv_cache else None for la in self.layers}
        widths = {la.ffn.intermediate_size if la.ffn.kind is FfnKind.MLP else None for la in self.layers}
        max_kv = next(iter(kvs)) if len(kvs) == 1 and None not in kvs else self.num_attention_heads
        max_i = next(iter(widths)) if len(widths) == 1 and None not in widths else 4 * self.hidden_size
        return {
            "architecture": "DeciLMForCausalLM",
            "dtype": dtype,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "hidden_act": self.hidden_act,
            "logits_dtype": "float32",
            "norm_epsilon": self.norm_epsilon,
            "runtime_defaults": None,
            "position_embedding_type": "rope_gpt_neox",
            "num_key_value_heads": max_kv,
            "intermediate_size": max_i,
            "max_position_embeddings": self.max_position_embeddings,
            "mapping": mapping,
            "quantization": quantization or default_quantization(),
            "use_parallel_embedding": use_parallel_embedding,
            "embedding_sharding_dim": embedding_sharding_dim,
            "head_size": self.head_dim,
            "qk_layernorm": False,
            "rotary_embedding_dim": self.head_dim,
            "rotary_base": float(self.rope_theta),
            "rotary_scaling": self.rope_dict(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "layer_configs": [la.to_trtllm() for la in self.layers],
            "layer_types": self.layer_types,
            "num_kv_heads_per_layer": self.kv_heads_per_layer,
        }


def default_quantization() -> dict[str, Any]:
    """TensorRT-LLM's ``QuantConfig`` dict with no quantization."""
    return {"quant_algo": None, "kv_cache_quant_algo": None, "group_size": 128, "smoothquant_val": 0.5,
            "clamp_val": None, "use_meta_recipe": False, "has_zero_point": False, "pre_quant_scale": False,
            "exclude_modules": None}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's FFN width: ``int(2*ffn_mult*H/3)`` rounded up to a multiple of 256."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % 256 == 0 else n + 256 - n % 256


# ---- HF parsing ----------------------------------------------------------------------------------------

def _check_block_keys(sub: dict[str, Any], known: set[str], where: str) -> None:
    for key, value in sub.items():
        if key not in known and value not in (None, False, [], {}):
            raise ConfigError(f"{where}: unsupported block variant field {key!r} = {show(value)}")
    for key in _UNSUPPORTED_IF_SET:
        if sub.get(key) not in (None, False, [], {}):
            raise ConfigError(f"{where}: {key!r} = {show(sub[key])} is not supported (only null/false)")


def hf_block_to_layer(block: dict[str, Any], layer: int, num_attention_heads: int, hidden_size: int) -> LayerSpec:
    """Convert one HF ``block_configs`` entry into a :class:`LayerSpec` (no_op first, then linear)."""
    if not isinstance(block, dict) or "attention" not in block or "ffn" not in block:
        raise ConfigError(f"layer {layer}: block config needs 'attention' and 'ffn' entries, got {show(block)}")
    att, ffn = block["attention"] or {}, block["ffn"] or {}
    for name, sub in (("attention", att), ("ffn", ffn)):
        if not isinstance(sub, dict):
            raise ConfigError(f"layer {layer} {name}: must be a JSON object, got {show(sub)}")
    _check_block_keys(att, _HF_ATTN_KEYS, f"layer {layer} attention")
    _check_block_keys(ffn, _HF_FFN_KEYS, f"layer {layer} ffn")
    for name, sub in (("attention", att), ("ffn", ffn)):
        if sub.get("no_op") and sub.get("replace_with_linear"):
            raise ConfigError(f"layer {layer} {name}: no_op and replace_with_linear are mutually exclusive")

    if att.get("no_op"):
        a = AttnSpec(AttnKind.NO_OP)
    elif att.get("replace_with_linear"):
        a = AttnSpec(AttnKind.LINEAR)
    else:
        group = att.get("n_heads_in_group")
        if type(group) is not int or group <= 0 or num_attention_heads % group:
            raise ConfigError(f"layer {layer} attention: n_heads_in_group={group!r} must divide "
                              f"num_attention_heads={num_attention_heads}")
        a = AttnSpec(AttnKind.ATTENTION, num_attention_heads // group)

    if ffn.get("no_op"):
        f = FfnSpec(FfnKind.NO_OP)
    elif ffn.get("replace_with_linear"):
        f = FfnSpec(FfnKind.LINEAR)
    else:
        mult = ffn.get("ffn_mult")
        if type(mult) not in (int, float) or not math.isfinite(mult) or mult <= 0:
            raise ConfigError(f"layer {layer} ffn: ffn_mult={show(mult)} must be a finite positive number")
        width = ffn_mult_to_intermediate_size(float(mult), hidden_size)
        if not 1 <= width <= MAX_WIDTH:
            raise ConfigError(f"layer {layer} ffn: ffn_mult={mult!r} gives an FFN width of {width} for hidden_size "
                              f"{hidden_size} (must be 1..{MAX_WIDTH})")
        f = FfnSpec(FfnKind.MLP, width)
    return LayerSpec(a, f)


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, Llama3Rope | None]:
    """RoPE theta and llama3 scaling from either the top-level keys or transformers 5's ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return float(theta), None
    rtype = scaling.get("rope_type", scaling.get("type"))
    if rtype in (None, "default"):
        return float(theta), None
    if rtype != "llama3":
        raise ConfigError(f"rope scaling type {rtype!r} is not supported (only llama3)")
    try:
        rope = Llama3Rope(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                          float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    except KeyError as exc:
        raise ConfigError(f"llama3 rope scaling is missing {exc.args[0]!r}") from None
    return float(theta), rope


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if cfg.get(key) is None:
        raise ConfigError(f"{where}: required key {key!r} is missing or null")
    return cfg[key]


def from_hf_config(cfg: dict[str, Any], where: str = "config.json") -> ModelSpec:
    """Parse an HF ``config.json`` of a ``nemotron-nas``, ``deci`` or plain ``llama`` model (validated first by
    :func:`nasrt.config_schema.check_hf_config`)."""
    check_hf_config(cfg, where)
    model_type = cfg.get("model_type")
    h = int(_require(cfg, "hidden_size", where))
    nh = int(_require(cfg, "num_attention_heads", where))
    if h % nh:
        raise ConfigError(f"{where}: hidden_size {h} is not divisible by num_attention_heads {nh}")
    head_dim = cfg.get("head_dim")
    if head_dim is not None and head_dim != h // nh:
        raise ConfigError(f"{where}: head_dim {head_dim} != hidden_size/num_attention_heads {h // nh}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConfigError(f"{where}: attention_bias/mlp_bias are not supported")
    act = cfg.get("hidden_act") or "silu"
    if act != "silu":
        raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    n_layers = int(_require(cfg, "num_hidden_layers", where))

    if model_type == "nemotron-nas" or cfg.get("block_configs") is not None:
        blocks = _require(cfg, "block_configs", where)
        if len(blocks) != n_layers:
            raise ConfigError(f"{where}: {len(blocks)} block_configs for num_hidden_layers={n_layers}")
        layers = tuple(hf_block_to_layer(b, i, nh, h) for i, b in enumerate(blocks))
    elif model_type == "deci" or cfg.get("num_key_value_heads_per_layer") is not None:
        kvs = _require(cfg, "num_key_value_heads_per_layer", where)
        inter = int(_require(cfg, "intermediate_size", where))
        if len(kvs) != n_layers:
            raise ConfigError(f"{where}: {len(kvs)} num_key_value_heads_per_layer for {n_layers} layers")
        layers = tuple(LayerSpec(AttnSpec(AttnKind.ATTENTION, int(kv)), FfnSpec(FfnKind.MLP, inter)) for kv in kvs)
    else:  # plain llama (check_hf_config refused every other model type)
        kv = int(cfg.get("num_key_value_heads") or nh)
        inter = int(_require(cfg, "intermediate_size", where))
        layers = tuple(LayerSpec(AttnSpec(AttnKind.ATTENTION, kv), FfnSpec(FfnKind.MLP, inter))
                       for _ in range(n_layers))
    for i, la in enumerate(layers):
        kv = la.attention.num_kv_heads
        if la.has_kv_cache and (kv <= 0 or nh % kv):
            raise ConfigError(f"layer {i} attention: {kv} KV heads do not divide {nh} attention heads")

    vocab = int(_require(cfg, "vocab_size", where))
    for key in ("bos_token_id", "eos_token_id"):
        ids = cfg.get(key)
        if any(i >= vocab for i in (ids if isinstance(ids, list) else [ids] if ids is not None else [])):
            raise ConfigError(f"{where}: {key} = {show(ids)} is outside vocab_size {vocab}")
    theta, rope = _rope_from_hf(cfg)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    return ModelSpec(
        hidden_size=h, num_attention_heads=nh, vocab_size=vocab, layers=layers,
        norm_epsilon=float(cfg.get("rms_norm_eps") or 1e-5), rope_theta=theta, rope_scaling=rope,
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), hidden_act=act,
        torch_dtype=str(dtype).replace("torch.", ""), bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
    )


def from_trtllm_config(cfg: dict[str, Any], where: str = "config.json") -> ModelSpec:
    """Parse a TensorRT-LLM ``DeciLMForCausalLM`` checkpoint ``config.json`` (``layer_configs`` or ModelOpt's
    ``block_configs``), validated first by :func:`nasrt.config_schema.check_trtllm_config`."""
    check_trtllm_config(cfg, where)
    h = int(_require(cfg, "hidden_size", where))
    nh = int(_require(cfg, "num_attention_heads", where))
    n_layers = int(_require(cfg, "num_hidden_layers", where))
    if cfg.get("layer_configs") is not None:
        layers = []
        for i, lc in enumerate(cfg["layer_configs"]):
            try:
                a, f = lc["attention"], lc["ffn"]
                ak, fk = AttnKind(a.get("impl", "attention")), FfnKind(f.get("impl", "mlp"))
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: layer_configs[{i}] is not a valid layer config: {exc}") from None
            kv = a.get("num_key_value_heads") or cfg.get("num_key_value_heads") or nh
            inter = f.get("intermediate_size") or cfg.get("intermediate_size") or 4 * h
            layers.append(LayerSpec(AttnSpec(ak, int(kv) if ak is AttnKind.ATTENTION else None),
                                    FfnSpec(fk, int(inter) if fk is FfnKind.MLP else None)))
        layers_t = tuple(layers)
    elif cfg.get("block_configs") is not None:
        layers_t = tuple(hf_block_to_layer(b, i, nh, h) for i, b in enumerate(cfg["block_configs"]))
    else:
        raise ConfigError(f"{where}: neither layer_configs nor block_configs present")
    if len(layers_t) != n_layers:
        raise ConfigError(f"{where}: {len(layers_t)} layer configs for num_hidden_layers={n_layers}")
    if h % nh:
        raise ConfigError(f"{where}: hidden_size {h} is not divisible by num_attention_heads {nh}")
    for i, la in enumerate(layers_t):
        kv = la.attention.num_kv_heads
        if la.has_kv_cache and (kv <= 0 or nh % kv):
            raise ConfigError(f"{where}: layer {i} attention: {kv} KV heads do not divide {nh} attention heads")
    scaling = cfg.get("rotary_scaling")
    rope = None
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
        try:
            rope = Llama3Rope(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                              float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
        except (KeyError, TypeError):
            raise ConfigError(f"{where}: rotary_scaling {show(scaling)} is missing a llama3 field") from None
    elif scaling:
        raise ConfigError(f"{where}: rotary_scaling {show(scaling)} is not supported (only llama3)")
    return ModelSpec(
        hidden_size=h, num_attention_heads=nh, vocab_size=int(_require(cfg, "vocab_size", where)), layers=layers_t,
        norm_epsilon=float(cfg.get("norm_epsilon") or 1e-5), rope_theta=float(cfg.get("rotary_base") or 10000.0),
        rope_scaling=rope, max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), hidden_act=cfg.get("hidden_act") or "silu",
        torch_dtype=cfg.get("dtype") or "bfloat16", bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"), extra={"trtllm_config": cfg},
    )


#: A JSON file nasrt reads (config, index, record) larger than this is refused before it is read.
MAX_JSON_BYTES = 64 << 20
_UTF16_32_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object from a regular UTF-8 file, every failure a :class:`ConfigError` naming the file.

    Refused: a missing file or one that is not a regular file (a FIFO would block forever), files over
    :data:`MAX_JSON_BYTES`, UTF-16/32 or otherwise non-UTF-8 bytes, invalid or too deeply nested JSON, integers too
    long to convert, and a top level that is not an object. NaN / Infinity literals parse here; the config schema
    (:mod:`nasrt.config_schema`) refuses them wherever nasrt reads the value.
    """
    path = Path(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file")
        if st.st_size > MAX_JSON_BYTES:
            raise ConfigError(f"{path}: {st.st_size} bytes is too large for a JSON file nasrt reads "
                              f"(limit {MAX_JSON_BYTES})")
        with open(path, "rb") as fh:
            data = fh.read(MAX_JSON_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.startswith(_UTF16_32_BOMS) or (len(data) >= 2 and b"\x00" in data[:4]):
        raise ConfigError(f"{path}: UTF-16/UTF-32 encoded; JSON files must be UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); JSON files must be UTF-8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{path}: JSON nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's int conversion limit
        raise ConfigError(f"{path}: invalid JSON value ({exc})") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: must hold a JSON object, got {type(obj).__name__}")
    return obj


def is_trtllm_config(cfg: dict[str, Any]) -> bool:
    return isinstance(cfg, dict) and "architecture" in cfg and ("layer_configs" in cfg or "mapping" in cfg)


def load_spec(path: str | Path) -> ModelSpec:
    """Load a :class:`ModelSpec` from an HF model dir, a TensorRT-LLM checkpoint dir or a config.json file."""
    p = Path(path)
    cfg_path = p / "config.json" if p.is_dir() else p
    cfg = read_json(cfg_path)
    if "pretrained_config" in cfg:  # engine dir
        cfg = cfg["pretrained_config"]
        if not isinstance(cfg, dict):
            raise ConfigError(f"{cfg_path}: pretrained_config = {show(cfg)} must be a JSON object")
    return from_trtllm_config(cfg, str(cfg_path)) if is_trtllm_config(cfg) else from_hf_config(cfg, str(cfg_path))
