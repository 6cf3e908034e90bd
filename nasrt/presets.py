"""Layer patterns and global settings of the released Nemotron-NAS models (shared/reference decilm-architecture §6).

Pattern legend ``layers:ATT/FFN``: ATT = ``gK`` (GQA, n_heads_in_group K), ``L`` (replace_with_linear),
``N`` (no_op); FFN = ffn_mult, ``N`` (no_op) or ``L`` (replace_with_linear).
"""

from __future__ import annotations

from typing import Any

from nasrt.errors import ConfigError

NEMOTRON_51B_PATTERN = """
0:g8/1.3125 1:g16/2.625 2-4:g8/5.25 5-6:g32/2.625 7-8:g64/2.625 9-10:g32/2.625 11:L/2.625 12:g64/2.625
13-14:g32/2.625 15:L/1.3125 16-34:g8/5.25 35:L/2.625 36-37:g8/5.25 38:L/2.625 39:L/5.25 40-42:L/2.625
43:N/1.3125 44:L/1.3125 45:g8/5.25 46:N/1.3125 47:L/1.3125 48:N/1.3125 49:g8/5.25 50:L/1.3125 51:N/1.3125
52-53:L/1.3125 54-55:N/1.3125 56:L/1.3125 57-58:N/1.3125 59-62:L/1.3125 63-79:g8/5.25
"""

SUPER_49B_PATTERN = """
0:g8/2.625 1-5:g8/5.25 6-7:N/2.625 8-10:g8/5.25 11:N/3.28125 12-41:g8/5.25 42:N/1.3125 43-44:N/2.625
45:N/1.3125 46:N/5.25 47:N/1.3125 48:N/2.625 49-51:N/1.3125 52:g8/5.25 53:N/1.3125 54-55:N/1.0 56:N/1.3125
57-59:N/1.0 60-61:N/1.3125 62-63:N/0.5 64-65:N/1.0 66-67:N/0.5 68:N/1.0 69-70:N/0.5 71-79:g8/5.25
"""

ULTRA_253B_PATTERN = """
0:g16/0.4875 1:g16/0.975 2-7:g16/1.4625 8:g16/1.95 9-12:N/N 13-15:g16/1.95 16-17:g16/4.875 18-23:N/N
24-26:g16/4.875 27-31:N/N 32-34:g16/4.875 35:g16/2.4375 36-38:N/N 39-41:g16/1.95 42:N/1.95 43:g16/4.875
44:N/4.875 45-49:N/N 50-53:g16/4.875 54-58:N/N 59-62:g16/4.875 63-67:N/N 68-71:g16/4.875 72-76:N/N
77-80:g16/4.875 81-85:N/N 86:g16/4.875 87-89:g16/3.4125 90-91:N/N 92:g16/2.925 93-95:g16/2.4375 96-97:N/2.4375
98:g16/2.4375 99:N/N 100-106:N/2.4375 107:g16/2.4375 108-112:N/N 113:g16/2.925 114:g16/4.875 115:N/4.875
116:g16/4.875 117-124:N/N 125:N/36.5625 126-133:N/N 134:N/39.0 135-142:N/N 143:N/31.40625 144-148:N/N
149:N/27.5625 150:N/1.95 151:g16/1.95 152:g16/2.4375 153:N/N 154-155:g16/2.4375 156:g16/3.4125
157-160:g16/4.875 161:g16/2.4375
"""

#: Eight layers covering every variant (and GQA groups that force K/V duplication up to tp 8).
ALL_VARIANTS_PATTERN = "0:g1/1.0 1:g2/7.0 2:g8/3.0 3:L/1.0 4:N/5.0 5:g4/L 6:g2/N 7:N/N"

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

#: Full-size HF settings of the released models (for config-only files used by ``nasrt plan`` / ``inspect``).
RELEASED: dict[str, dict[str, Any]] = {
    "nemotron-51b": {"pattern": NEMOTRON_51B_PATTERN, "hidden_size": 8192, "num_attention_heads": 64,
                     "vocab_size": 128256, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE,
                     "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
    "super-49b": {"pattern": SUPER_49B_PATTERN, "hidden_size": 8192, "num_attention_heads": 64,
                  "vocab_size": 128256, "rope_theta": 500000.0, "rope_scaling": _LLAMA3_ROPE,
                  "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
    "ultra-253b": {"pattern": ULTRA_253B_PATTERN, "hidden_size": 16384, "num_attention_heads": 128,
                   "vocab_size": 128256, "rope_theta": 500000.0, "rope_scaling": {**_LLAMA3_ROPE, "factor": 16.0},
                   "max_position_embeddings": 131072, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]},
}


def parse_pattern(pattern: str) -> list[dict[str, Any]]:
    """Expand a pattern string into HF ``block_configs`` entries (one per layer, in order)."""
    blocks: dict[int, dict[str, Any]] = {}
    for token in pattern.split():
        try:
            span, kinds = token.split(":")
            att, ffn = kinds.split("/")
            lo, _, hi = span.partition("-")
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise ConfigError(f"layer pattern token {token!r} is not 'A-B:ATT/FFN'") from None
        if att == "N":
            a = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
        elif att == "L":
            a = {"no_op": False, "replace_with_linear": True, "n_heads_in_group": None}
        elif att.startswith("g"):
            a = {"no_op": False, "replace_with_linear": False, "n_heads_in_group": int(att[1:])}
        else:
            raise ConfigError(f"layer pattern token {token!r}: attention must be gK, L or N")
        if ffn == "N":
            f = {"no_op": True, "replace_with_linear": False, "ffn_mult": None}
        elif ffn == "L":
            f = {"no_op": False, "replace_with_linear": True, "ffn_mult": None}
        else:
            f = {"no_op": False, "replace_with_linear": False, "ffn_mult": float(ffn)}
        for layer in range(first, last + 1):
            blocks[layer] = {"attention": dict(a, sparsify=None), "ffn": dict(f, sparsify=None)}
    if sorted(blocks) != list(range(len(blocks))):
        raise ConfigError("layer pattern does not cover layers 0..N-1 exactly once")
    return [blocks[i] for i in range(len(blocks))]


def hf_config(pattern: str, *, hidden_size: int, num_attention_heads: int, vocab_size: int,
              rope_theta: float = 500000.0, rope_scaling: dict[str, Any] | None = None,
              max_position_embeddings: int = 131072, bos_token_id: int | None = 1,
              eos_token_id: int | list[int] | None = 2, torch_dtype: str = "bfloat16",
              tie_word_embeddings: bool = False) -> dict[str, Any]:
    """An HF ``nemotron-nas`` ``config.json`` for a layer pattern."""
    blocks = parse_pattern(pattern)
    return {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        "hidden_size": hidden_size, "num_attention_heads": num_attention_heads,
        "num_hidden_layers": len(blocks), "num_key_value_heads": None, "intermediate_size": None,
        "vocab_size": vocab_size, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": rope_theta,
        "rope_scaling": rope_scaling, "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": torch_dtype,
        "block_configs": blocks,
    }


def released_config(name: str) -> dict[str, Any]:
    """The full-size HF ``config.json`` of a released model (``nemotron-51b``, ``super-49b``, ``ultra-253b``)."""
    if name not in RELEASED:
        raise ConfigError(f"unknown model {name!r}; known: {sorted(RELEASED)}")
    settings = dict(RELEASED[name])
    return hf_config(settings.pop("pattern"), **settings)
