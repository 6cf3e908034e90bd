"""Write calibrated FP8 checkpoints: TensorRT-LLM (through the converter, so TP/PP sharding is its) and the
unified HF FP8 checkpoint (``hf_quant_config.json``) that the TensorRT-LLM PyTorch backend and vLLM read.

Scale semantics (ModelOpt's): every scale is ``amax / 448`` (float32). TensorRT-LLM fuses q/k/v into one GEMM
and may fuse fc/gate, so those groups share one weight scale (the max) with the weights re-quantized to it,
and one activation scale. ``kv_cache_scaling_factor`` is ``max(k_scale, v_scale)`` on attention layers only,
clamped to >= 1.0 unless ``kv_cache_scales == "calibrated"``. The unified HF export keeps the calibrated K/V scales
as ModelOpt's ``export_hf_checkpoint`` does, and writes the shared group scale as each projection's
``weight_scale`` (ModelOpt 0.47 keeps per-projection FP8 weight scales, but every consumer fuses q/k/v and gate/up
and re-quantizes them to the max at load -- TensorRT-LLM's PyTorch backend ``rescale_fused_weights``, vLLM --
so quantizing once with the shared scale avoids a second rounding and both exports carry the same FP8 values).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import nasrt
from nasrt.arch import AttnKind, ModelSpec, default_quantization
from nasrt.atomic import write_json
from nasrt.convert import ConvertOptions, Scales, trtllm_config, write_rank
from nasrt.errors import CheckpointError
from nasrt.fp8 import FP8_DTYPE, quantize, scale_from_amax
from nasrt.quantize.calibrate import AmaxTable, QuantSettings
from nasrt.quantize.gptq import RoundedWeights
from nasrt.st_io import torch_dtype, write_safetensors_stream
from nasrt.tensor_map import (
    ACT_SCALE,
    FP8_FUSED_GROUPS,
    WEIGHT_SCALE,
    TensorRule,
    expected_hf_tensors,
    layer_rules,
    lm_head_rule,
)

log = logging.getLogger(__name__)

#: TensorRT-LLM linears whose weight scales are unified (fc and gate may be fused into one GEMM).
FUSED_GROUPS = FP8_FUSED_GROUPS
KV_SCALE_MODES = ("clamped", "calibrated")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


def _module(hf_weight: str) -> str:
    return hf_weight.rsplit(".weight", 1)[0]


def _amax(table: AmaxTable, module: str, kind: str) -> torch.Tensor:
    try:
        return table[module][kind]
    except KeyError:
        raise CheckpointError(f"{module}: no calibrated {kind} amax (was the module calibrated?)") from None


def _qkv_rule(layer) -> TensorRule:
    return next(r for r in layer_rules(layer) if r.linear == "attention.qkv")


@dataclass
class FP8Scales:
    """Everything the writers need, derived from one amax table."""

    trt: Scales  # (global layer, TRT linear) -> {weights_scaling_factor, activation_scaling_factor}
    kv: dict[int, torch.Tensor]  # global layer -> kv_cache_scaling_factor (TRT-LLM)
    weight_quant: dict[str, torch.Tensor]  # HF weight name -> the scale its TRT-LLM FP8 weight is quantized with
    hf: dict[str, torch.Tensor]  # unified HF checkpoint scale tensors (weight_scale, input_scale, k/v_scale)


def fp8_scales(table: AmaxTable, spec: ModelSpec, settings: QuantSettings,
               kv_cache_scales: str = "clamped") -> FP8Scales:
    """Turn calibrated amax values into TensorRT-LLM and unified-HF FP8 scales."""
    if kv_cache_scales not in KV_SCALE_MODES:
        raise CheckpointError(f"--kv_cache_scales {kv_cache_scales!r} is not one of {list(KV_SCALE_MODES)}")
    out = FP8Scales({}, {}, {}, {})
    for i, layer in enumerate(spec.layers):
        rules = [r for r in layer_rules(layer) if r.linear and f"transformer.layers.{i}.{r.linear}"
                 not in settings.exclude]  # excluded linears stay in the checkpoint dtype, without scales
        group_w: dict[str, torch.Tensor] = {}
        group_a: dict[str, torch.Tensor] = {}
        for rule in rules:
            modules = [_module(n) for n in rule.hf_names(i)]
            group_w[rule.linear] = torch.stack([_amax(table, m, "weight") for m in modules]).max()
            group_a[rule.linear] = torch.stack([_amax(table, m, "input") for m in modules]).max()
        for group in FUSED_GROUPS:
            present = [g for g in group if g in group_w]
            if len(present) > 1:
                w = torch.stack([group_w[g] for g in present]).max()
                a = torch.stack([group_a[g] for g in present]).max()
                for g in present:
                    group_w[g], group_a[g] = w, a
        for rule in rules:
            w, a = scale_from_amax(group_w[rule.linear]), scale_from_amax(group_a[rule.linear])
            out.trt[(i, rule.linear)] = {WEIGHT_SCALE: w, ACT_SCALE: a}
            for name in rule.hf_names(i):
                out.weight_quant[name] = w
                out.hf[f"{_module(name)}.weight_scale"] = w.reshape(())
                out.hf[f"{_module(name)}.input_scale"] = a.reshape(())
        if settings.kv and layer.attention.kind is AttnKind.ATTENTION:
            _, k_proj, v_proj = (_module(n) for n in _qkv_rule(layer).hf_names(i))
            attn = k_proj.rsplit(".", 1)[0]  # the attention module owns the k/v bmm quantizers
            k, v = scale_from_amax(_amax(table, attn, "k")), scale_from_amax(_amax(table, attn, "v"))
            out.hf[f"{k_proj}.k_scale"] = k.reshape(())
            out.hf[f"{v_proj}.v_scale"] = v.reshape(())
            if kv_cache_scales == "clamped":
                one = torch.ones(1, dtype=torch.float32)
                k, v = torch.maximum(k, one), torch.maximum(v, one)
            out.kv[i] = torch.maximum(k, v)
    if settings.quantize_lm_head:
        w, a = scale_from_amax(_amax(table, "lm_head", "weight")), scale_from_amax(_amax(table, "lm_head", "input"))
        out.hf["lm_head.weight_scale"], out.hf["lm_head.input_scale"] = w.reshape(()), a.reshape(())
    return out


class QuantizingReader:
    """The reader interface over an HF checkpoint whose listed weights are served as FP8 (quantized on read).

    Quantization is element-wise, so quantizing a TP slice equals slicing the quantized tensor; the converter
    therefore streams FP8 rank tensors without ever holding a quantized model. Weights in ``rounded`` (GPTQ) are
    served as the FP8 codes chosen at calibration time instead (sliced the same way).
    """

    def __init__(self, base, scales: dict[str, torch.Tensor], aliases: dict[str, str] | None = None,
                 rounded: RoundedWeights | None = None):
        self.base, self.scales, self.aliases = base, scales, aliases or {}
        self.rounded = rounded
        self.dir = getattr(base, "dir", None)

    def _codes(self, name: str) -> bool:
        if self.rounded is None or name not in self.scales or self._src(name) not in self.rounded:
            return False
        self.rounded.check_scale(self._src(name), self.scales[name])
        return True

    def _src(self, name: str) -> str:
        return self.aliases.get(name, name)

    def names(self) -> list[str]:
        return [*self.base.names(), *self.aliases]

    def __contains__(self, name: str) -> bool:
        return name in self.aliases or name in self.base

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(self._src(name))

    def dtype(self, name: str) -> torch.dtype:
        return FP8_DTYPE if name in self.scales else self.base.dtype(self._src(name))

    def _q(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return quantize(t, self.scales[name]) if name in self.scales else t

    def get(self, name: str) -> torch.Tensor:
        if self._codes(name):
            return self.rounded.get(self._src(name))
        return self._q(name, self.base.get(self._src(name)))

    def read(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        if self._codes(name):
            return self.rounded.read(self._src(name), dim, start, stop)
        return self._q(name, self.base.read(self._src(name), dim, start, stop))


def exclude_modules(settings: QuantSettings) -> list[str]:
    """TensorRT-LLM ``exclude_modules``: a non-null list replaces the built-in default, so lm_head is named;
    then the linears kept BF16 by ``--bf16_budget`` (module names, matched by ``quantize_layers`` with fnmatch)."""
    return ([] if settings.quantize_lm_head else ["lm_head"]) + list(settings.exclude)


def hf_exclude_modules(settings: QuantSettings) -> list[str]:
    """``exclude_modules`` of the unified checkpoint: HF module names (the PyTorch backend also matches a fused
    ``qkv_proj`` / ``gate_up_proj`` by its ``q/k/v_proj`` / ``gate/up_proj`` names)."""
    return ([] if settings.quantize_lm_head else ["lm_head"]) + list(settings.hf_exclude)


def trtllm_quantization(settings: QuantSettings, has_kv: bool) -> dict[str, Any]:
    q = default_quantization()
    q.update({"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if settings.kv and has_kv else None,
              "exclude_modules": exclude_modules(settings)})
    return q


def export_trtllm(reader, spec: ModelSpec, opts: ConvertOptions, dtype: str, scales: FP8Scales,
                  settings: QuantSettings, out_dir: Path, progress: bool = True,
                  rounded: RoundedWeights | None = None) -> None:
    """TensorRT-LLM FP8 checkpoint (config.json + rank files) into ``out_dir`` (already a temporary dir); FP8
    weights from ``rounded`` where it has them (GPTQ), else quantized to nearest."""
    qreader = QuantizingReader(reader, scales.weight_quant, rounded=rounded)
    trt = dict(scales.trt)
    if settings.quantize_lm_head:
        head_src = lm_head_rule(spec).hf_names()[0]
        if spec.tie_word_embeddings:  # the embedding stays unquantized: serve lm_head under its own name
            spec = _untied(spec)
            qreader = QuantizingReader(reader, {**scales.weight_quant, "lm_head.weight": _lm_scale(scales)},
                                       aliases={"lm_head.weight": head_src}, rounded=rounded)
        else:
            qreader.scales = {**scales.weight_quant, head_src: _lm_scale(scales)}
        trt[(None, "lm_head")] = {WEIGHT_SCALE: _lm_scale(scales),
                                  ACT_SCALE: scales.hf["lm_head.input_scale"].reshape(1)}
    cfg = trtllm_config(spec, opts, dtype, trtllm_quantization(settings, bool(scales.kv)))
    write_json(out_dir / "config.json", cfg)
    for rank in range(opts.mapping.world_size):
        write_rank(qreader, spec, opts, dtype, rank, out_dir, scales=trt, kv_scales=scales.kv, progress=progress)


def _lm_scale(scales: FP8Scales) -> torch.Tensor:
    return scales.hf["lm_head.weight_scale"].reshape(1)


def _untied(spec: ModelSpec) -> ModelSpec:
    from dataclasses import replace

    return replace(spec, tie_word_embeddings=False)


# ---- unified HF FP8 checkpoint ------------------------------------------------------------------------------

SHARD_BYTES = 4 << 30


def hf_quant_config(settings: QuantSettings, has_kv: bool) -> dict[str, Any]:
    return {"producer": {"name": "nasrt", "version": nasrt.__version__},
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8" if settings.kv and has_kv else None,
                             "exclude_modules": hf_exclude_modules(settings)}}


def _quantization_config(settings: QuantSettings, has_kv: bool) -> dict[str, Any]:
    fp8 = {"dynamic": False, "num_bits": 8, "type": "float"}
    q = hf_quant_config(settings, has_kv)
    cfg: dict[str, Any] = {"quant_method": "modelopt", "quant_algo": "FP8", "producer": q["producer"],
                           "ignore": q["quantization"]["exclude_modules"],
                           "config_groups": {"group_0": {"input_activations": dict(fp8), "weights": dict(fp8),
                                                         "targets": ["Linear"]}}}
    if settings.kv and has_kv:
        cfg["kv_cache_scheme"] = dict(fp8)
        cfg["kv_cache_quant_algo"] = "FP8"
    return cfg


def export_hf(reader, spec: ModelSpec, hf_config: dict[str, Any], dtype: str, scales: FP8Scales,
              settings: QuantSettings, out_dir: Path, tokenizer_dir: Path | None = None,
              rounded: RoundedWeights | None = None) -> None:
    """Unified HF FP8 checkpoint: FP8 ``weight`` + ``weight_scale`` / ``input_scale`` per linear,
    ``k_proj.k_scale`` / ``v_proj.v_scale`` per attention layer, everything else in ``dtype``; FP8 weights from
    ``rounded`` where it has them (the same codes the TensorRT-LLM export writes)."""
    target = torch_dtype(dtype)
    per_proj = {n.rsplit(".weight_scale", 1)[0] + ".weight": s for n, s in scales.hf.items()
                if n.endswith(".weight_scale")}
    tensors = list(expected_hf_tensors(spec).items())
    if settings.quantize_lm_head and spec.tie_word_embeddings:
        tensors.append(("lm_head.weight", (spec.vocab_size, spec.hidden_size)))
    # FP8 weights are quantized on read (or are the GPTQ codes), exactly as for the TensorRT-LLM export
    tied = {"lm_head.weight": "model.embed_tokens.weight"} if spec.tie_word_embeddings else None
    qreader = QuantizingReader(reader, per_proj, aliases=tied, rounded=rounded)
    entries: list[tuple[str, torch.dtype, tuple[int, ...], Any]] = []
    for name, shape in tensors:
        entries.append((name, FP8_DTYPE if name in per_proj else target, tuple(shape), ("read", name)))
    has_kv = any(n.endswith("k_scale") for n in scales.hf)
    for name, value in scales.hf.items():
        entries.append((name, torch.float32, (), ("value", value)))

    def produce(job):
        if job[0] == "value":
            return job[1].to(torch.float32).reshape(())
        _, name = job
        t = qreader.read(name, 0, 0, qreader.shape(name)[0])  # one tensor at a time, not through a memory map
        return t if name in per_proj else t.to(target)

    shards: list[list[tuple[str, torch.dtype, tuple[int, ...], Any]]] = [[]]
    size = 0
    for e in entries:
        nbytes = torch.Size(e[2]).numel() * torch.empty((), dtype=e[1]).element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_stream(out_dir / fname, [(n, d, s) for n, d, s, _ in shard],
                                 (produce(job) for *_, job in shard), metadata={"format": "pt"})
        weight_map.update({n: fname for n, *_ in shard})
    if len(shards) > 1:
        write_json(out_dir / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    cfg = dict(hf_config)
    cfg["torch_dtype"] = dtype
    cfg.pop("dtype", None)
    if settings.quantize_lm_head and spec.tie_word_embeddings:
        cfg["tie_word_embeddings"] = False
    cfg["quantization_config"] = _quantization_config(settings, has_kv)
    write_json(out_dir / "config.json", cfg)
    write_json(out_dir / "hf_quant_config.json", hf_quant_config(settings, has_kv))
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / fname).is_file():
                shutil.copy2(Path(tokenizer_dir) / fname, out_dir / fname)
