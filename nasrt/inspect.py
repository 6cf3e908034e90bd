"""Per-layer report of a model: HF dir, TensorRT-LLM checkpoint or engine dir (data + a text formatter).

Everything is derived from :class:`nasrt.arch.ModelSpec` (read with :func:`nasrt.arch.load_spec`); nothing is
recomputed here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nasrt.arch import AttnKind, FfnKind, ModelSpec, load_spec, read_json


@dataclass(frozen=True)
class LayerRow:
    layer: int
    attention: str
    kv_heads: int | None
    ffn: str
    width: int | None
    params: int


@dataclass(frozen=True)
class Inspection:
    """What ``nasrt inspect`` reports; :meth:`to_dict` is the ``--json`` form."""

    path: str
    source: str  # "hf", "trtllm-checkpoint" or "trtllm-engine"
    dtype: str
    hidden_size: int
    num_attention_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tp_size: int
    pp_size: int
    quant_algo: str | None
    kv_cache_quant_algo: str | None
    layers: tuple[LayerRow, ...]
    attention_counts: dict[str, int]
    ffn_counts: dict[str, int]
    kv_heads_total: int
    kv_heads_histogram: dict[int, int]
    params: int
    kv_bytes_per_token: dict[str, float]  # "bf16" / "fp8" unsharded, "<dtype>_per_rank" at tp_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(r) for r in self.layers]
        d["kv_heads_histogram"] = {str(k): v for k, v in self.kv_heads_histogram.items()}
        return d


def _source_kind(path: Path) -> tuple[str, dict[str, Any]]:
    cfg_path = path / "config.json" if path.is_dir() else path
    cfg = read_json(cfg_path)
    if "pretrained_config" in cfg:
        return "trtllm-engine", cfg["pretrained_config"]
    if "architecture" in cfg and ("layer_configs" in cfg or "mapping" in cfg):
        return "trtllm-checkpoint", cfg
    return "hf", cfg


def inspect_spec(spec: ModelSpec, path: str = "", source: str = "hf", cfg: dict[str, Any] | None = None
                 ) -> Inspection:
    """Build the report of ``spec``; ``cfg`` (a TensorRT-LLM config) adds mapping, dtype and quantization."""
    cfg = cfg or {}
    mapping = cfg.get("mapping") or {}
    quant = cfg.get("quantization") or {}
    tp, pp = int(mapping.get("tp_size") or 1), int(mapping.get("pp_size") or 1)
    rows = tuple(LayerRow(i, la.attention.kind.value, la.attention.num_kv_heads, la.ffn.kind.value,
                          la.ffn.intermediate_size, spec.layer_params(i)) for i, la in enumerate(spec.layers))
    att = Counter(la.attention.kind for la in spec.layers)
    ffn = Counter(la.ffn.kind for la in spec.layers)
    kv = {"bf16": spec.kv_bytes_per_token(2), "fp8": spec.kv_bytes_per_token(1)}
    if tp > 1:
        kv.update(bf16_per_rank=spec.kv_bytes_per_token(2, tp), fp8_per_rank=spec.kv_bytes_per_token(1, tp))
    return Inspection(
        path=path, source=source, dtype=str(cfg.get("dtype", spec.torch_dtype)), hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads, head_dim=spec.head_dim, vocab_size=spec.vocab_size,
        tie_word_embeddings=spec.tie_word_embeddings, rope_theta=spec.rope_theta, rope_scaling=spec.rope_dict(),
        tp_size=tp, pp_size=pp, quant_algo=quant.get("quant_algo"),
        kv_cache_quant_algo=quant.get("kv_cache_quant_algo"), layers=rows,
        attention_counts={k.value: att[k] for k in AttnKind}, ffn_counts={k.value: ffn[k] for k in FfnKind},
        kv_heads_total=sum(spec.kv_heads_per_layer),
        kv_heads_histogram=dict(sorted(Counter(spec.kv_heads_per_layer).items(), reverse=True)),
        params=spec.num_params, kv_bytes_per_token=kv,
    )


def inspect_model(path: str | Path) -> Inspection:
    """Report of an HF model dir, a TensorRT-LLM checkpoint dir, an engine dir or a config.json file."""
    p = Path(path)
    source, cfg = _source_kind(p)
    spec = load_spec(p)
    return inspect_spec(spec, str(p), source, cfg if source != "hf" else None)


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _kib(n: float) -> str:
    return f"{n / 1024:g} KiB"


def format_inspection(ins: Inspection) -> str:
    """The human-readable per-layer table and totals."""
    head = f"{'layer':>5}  {'attention':<9}  {'kv':>3}  {'ffn':<6}  {'width':>6}  {'params':>8}"
    lines = [f"{ins.path} ({ins.source}, {ins.dtype}): hidden {ins.hidden_size}, {ins.num_attention_heads} heads "
             f"x {ins.head_dim}, vocab {ins.vocab_size}, {'tied' if ins.tie_word_embeddings else 'untied'} "
             f"embeddings, rope theta {ins.rope_theta:g}"
             + (f" ({ins.rope_scaling['rope_type']} x{ins.rope_scaling['factor']:g})" if ins.rope_scaling else "")]
    if ins.source != "hf":
        lines.append(f"mapping: tp {ins.tp_size}, pp {ins.pp_size}; quantization: {ins.quant_algo or 'none'}, "
                     f"KV cache {ins.kv_cache_quant_algo or 'not quantized'}")
    lines += ["", head, "-" * len(head)]
    for r in ins.layers:
        lines.append(f"{r.layer:>5}  {r.attention:<9}  {r.kv_heads if r.kv_heads else '-':>3}  {r.ffn:<6}  "
                     f"{r.width if r.width else '-':>6}  {_count(r.params):>8}")
    a, f = ins.attention_counts, ins.ffn_counts
    hist = ", ".join(f"{v} x kv{k}" for k, v in ins.kv_heads_histogram.items()) or "none"
    kv = ins.kv_bytes_per_token
    lines += [
        "",
        f"layers: {len(ins.layers)}; attention {a['attention']} / linear {a['linear']} / no_op {a['no_op']}; "
        f"ffn mlp {f['mlp']} / linear {f['linear']} / no_op {f['no_op']}",
        f"KV heads: {ins.kv_heads_total} in total ({hist})",
        f"parameters: {ins.params:,} ({_count(ins.params)})",
        f"KV cache per token: bf16 {_kib(kv['bf16'])}, fp8 {_kib(kv['fp8'])}",
    ]
    if "bf16_per_rank" in kv:
        lines.append(f"KV cache per token per rank at tp {ins.tp_size}: bf16 {_kib(kv['bf16_per_rank'])}, "
                     f"fp8 {_kib(kv['fp8_per_rank'])}")
    return "\n".join(lines)
