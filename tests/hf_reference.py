"""Per-layer facts read straight from HF ``block_configs`` with the reference doc's formulas, independently of
nasrt's own parser, for tests that check nasrt against them."""

from __future__ import annotations

import math


def raw_layers(cfg: dict) -> list[tuple[str, int, str, int]]:
    """(attention kind, kv heads, ffn kind, intermediate size) per layer; 0 where a sub-block has none."""
    nh, h = cfg["num_attention_heads"], cfg["hidden_size"]
    out = []
    for b in cfg["block_configs"]:
        a, f = b["attention"], b["ffn"]
        ak = "no_op" if a.get("no_op") else "linear" if a.get("replace_with_linear") else "attention"
        fk = "no_op" if f.get("no_op") else "linear" if f.get("replace_with_linear") else "mlp"
        kv = nh // a["n_heads_in_group"] if ak == "attention" else 0
        inter = 0
        if fk == "mlp":
            n = int(2 * f["ffn_mult"] * h / 3)  # rounded up to a multiple of 256
            inter = math.ceil(n / 256) * 256
        out.append((ak, kv, fk, inter))
    return out
