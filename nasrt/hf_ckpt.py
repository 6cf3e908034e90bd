"""Read what TensorRT-LLM's PyTorch backend reads -- an HF DeciLM / Llama safetensors dir, BF16 or ModelOpt's unified
HF FP8 checkpoint -- into the same unsharded :class:`~nasrt.trtllm_ckpt.TrtllmCheckpoint` a converted checkpoint
gives, so the reference runtime has one model implementation and one in-memory layout.

Tensors are planned with the converter's own plan (:func:`nasrt.convert.plan_rank` at tp 1, i.e. the name table of
:mod:`nasrt.tensor_map`) and read one at a time through the validated, pickle-free
:class:`~nasrt.st_io.SafetensorsReader`.

Quantization is read from ``hf_quant_config.json`` first, then ``config.json``'s ``quantization_config``
(``quant_method: modelopt``), as the PyTorch backend does. FP8 linears carry ``weight_scale`` and ``input_scale``;
q/k/v (one GEMM) and gate/up (``FP8_FUSED_GROUPS``) take the group's max scales with the other members re-quantized
to it exactly as the PyTorch backend's ``rescale_fused_weights`` does (FP8 -> checkpoint dtype, ``* own / max``,
-> FP8); KV-cache scales ``k_scale`` / ``v_scale`` become ``kv_cache_scaling_factor = max(k, v)`` (the engine's one
scale; the PyTorch backend keeps K and V apart). Modules named by ``exclude_modules`` must stay unquantized.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nasrt.arch import ModelSpec, default_quantization, from_hf_config, read_json
from nasrt.config_schema import show
from nasrt.convert import ConvertOptions, plan_rank, trtllm_config, validate_source
from nasrt.errors import CheckpointError, ConfigError
from nasrt.fp8 import FP8_DTYPE
from nasrt.sharding import assemble
from nasrt.st_io import SafetensorsReader
from nasrt.tensor_map import FP8_FUSED_GROUPS, HF_FP8_SCALES, HF_KV_SCALES, KV_SCALE, TensorRule
from nasrt.trtllm_ckpt import TrtllmCheckpoint

log = logging.getLogger(__name__)

HF_QUANT_CONFIG = "hf_quant_config.json"
#: ``quant_algo`` / ``kv_cache_quant_algo`` values the reference runtime runs.
QUANT_ALGOS = (None, "FP8")
KV_CACHE_QUANT_ALGOS = (None, "FP8")
#: compressed-tensors style ``kv_cache_scheme`` of ModelOpt's inline ``quantization_config`` meaning FP8 E4M3.
FP8_SCHEME = {"num_bits": 8, "type": "float"}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class HfQuantization:
    """The checkpoint's quantization as the PyTorch backend reads it, and which file said so."""

    quant_algo: str | None
    kv_cache_quant_algo: str | None
    exclude_modules: tuple[str, ...]
    source: str

    def excluded(self, module: str) -> bool:
        """Whether HF module ``module`` (``lm_head``, ``model.layers.3.mlp.up_proj``) is left unquantized."""
        return any(fnmatch.fnmatchcase(module, pat) for pat in self.exclude_modules)


def _algo(value: Any, allowed: tuple[str | None, ...], where: str) -> str | None:
    if value not in allowed:
        raise ConfigError(f"{where} = {show(value)} is not supported by the reference runtime "
                          f"(only {', '.join(str(a) for a in allowed)})")
    return value


def _excludes(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} = {show(value)} must be a list of module names")
    return tuple(value)


def read_quantization(model_dir: str | Path, cfg: dict[str, Any] | None = None) -> HfQuantization:
    """``hf_quant_config.json``'s ``quantization`` if the file exists, else ``config.json``'s ModelOpt
    ``quantization_config``, else no quantization."""
    model_dir = Path(model_dir)
    hq = model_dir / HF_QUANT_CONFIG
    if hq.exists():
        q = read_json(hq).get("quantization")
        if not isinstance(q, dict):
            raise ConfigError(f"{hq}: 'quantization' must be a JSON object, got {show(q)}")
        where = f"{hq}: quantization"
        return HfQuantization(_algo(q.get("quant_algo"), QUANT_ALGOS, f"{where}.quant_algo"),
                              _algo(q.get("kv_cache_quant_algo"), KV_CACHE_QUANT_ALGOS,
                                    f"{where}.kv_cache_quant_algo"),
                              _excludes(q.get("exclude_modules"), f"{where}.exclude_modules"), str(hq))
    cfg_path = model_dir / "config.json"
    cfg = read_json(cfg_path) if cfg is None else cfg
    qc = cfg.get("quantization_config")
    if qc is None:
        return HfQuantization(None, None, (), "none")
    where = f"{cfg_path}: quantization_config"
    if not isinstance(qc, dict):
        raise ConfigError(f"{where} must be a JSON object, got {show(qc)}")
    if qc.get("quant_method") != "modelopt":
        raise ConfigError(f"{where}.quant_method = {show(qc.get('quant_method'))} is not supported (only ModelOpt's "
                          "unified HF checkpoint, quant_method 'modelopt')")
    kv = qc.get("kv_cache_quant_algo")
    scheme = qc.get("kv_cache_scheme")
    if kv is None and scheme is not None:
        if not isinstance(scheme, dict) or {k: scheme.get(k) for k in FP8_SCHEME} != FP8_SCHEME:
            raise ConfigError(f"{where}.kv_cache_scheme = {show(scheme)} is not FP8 (num_bits 8, type float)")
        kv = "FP8"
    excl = qc.get("ignore", qc.get("exclude_modules"))
    return HfQuantization(_algo(qc.get("quant_algo"), QUANT_ALGOS, f"{where}.quant_algo"),
                          _algo(kv, KV_CACHE_QUANT_ALGOS, f"{where}.kv_cache_quant_algo"),
                          _excludes(excl, f"{where}.ignore"), str(cfg_path))


class _WeightsView:
    """The reader interface over the weight tensors only (scale tensors hidden), for the converter's validation."""

    def __init__(self, reader: SafetensorsReader, hidden: set[str]):
        self.reader, self.hidden, self.dir = reader, hidden, reader.dir

    def names(self) -> list[str]:
        return [n for n in self.reader.names() if n not in self.hidden]

    def __getattr__(self, name: str):
        return getattr(self.reader, name)


def _scalar(reader: SafetensorsReader, name: str) -> torch.Tensor:
    t = reader.get(name)
    if t.numel() != 1 or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise CheckpointError(f"{reader.dir}: tensor {name!r} must be one float (a per-tensor FP8 scale), got "
                              f"{t.dtype} {list(t.shape)}")
    value = t.to(torch.float32).reshape(())
    if not bool(torch.isfinite(value)) or float(value) <= 0:
        raise CheckpointError(f"{reader.dir}: tensor {name!r} = {float(value)} must be a positive finite scale")
    return value


def _module(hf_weight: str) -> str:
    return hf_weight.removesuffix(".weight")


@dataclass
class _Fp8Linear:
    """One TensorRT-LLM linear's FP8 scales and the HF weights re-quantized to them."""

    weight_scale: torch.Tensor
    input_scale: torch.Tensor
    rescale: dict[str, torch.Tensor]  # HF weight -> its own scale, where it differs from the group's


class HfLoader:
    """Plans and reads one HF dir into TensorRT-LLM names (tp 1), validating every tensor first."""

    def __init__(self, model_dir: str | Path, allow_external: bool = False):
        self.dir = Path(model_dir)
        cfg_path = self.dir / "config.json"
        self.hf_config = read_json(cfg_path)
        self.spec: ModelSpec = from_hf_config(self.hf_config, str(cfg_path))
        self.quant = read_quantization(self.dir, self.hf_config)
        self.reader = SafetensorsReader(self.dir, allow_external=allow_external)
        self.dtype = self.spec.torch_dtype if self.spec.torch_dtype in COMPUTE_DTYPES else "bfloat16"
        self.plan = plan_rank(self.spec, ConvertOptions(self.dtype), 0)
        self.scale_names: set[str] = set()
        self.linears: dict[tuple[int | None, str], _Fp8Linear] = {}
        self.kv: dict[int, torch.Tensor] = {}
        self._check_quantized()
        validate_source(_WeightsView(self.reader, self.scale_names), self.spec)

    # ---- validation ------------------------------------------------------------------------------------------
    def _groups(self) -> dict[tuple[int | None, str], list[tuple[TensorRule, str]]]:
        """(global layer, first TRT linear of its GEMM group) -> [(rule, HF weight)] of the linears run as one GEMM."""
        groups: dict[tuple[int | None, str], list[tuple[TensorRule, str]]] = {}
        for _planned, rule, glob in self.plan:
            if rule.linear:
                key = (glob, next((g[0] for g in FP8_FUSED_GROUPS if rule.linear in g), rule.linear))
                groups.setdefault(key, []).extend((rule, n) for n in rule.hf_names(glob))
        return groups

    def _check_quantized(self) -> None:
        fp8 = self.quant.quant_algo == "FP8"
        seen: set[str] = set()
        for (glob, _first), members in self._groups().items():
            quantized = []
            for rule, name in members:
                scales = {s: f"{_module(name)}.{s}" for s in HF_FP8_SCALES}
                present = [n for n in scales.values() if n in self.reader]
                self.scale_names.update(present)
                if name not in self.reader or self.reader.dtype(name) != FP8_DTYPE:
                    if present:
                        raise CheckpointError(f"{self.dir}: {present[0]!r} belongs to {name!r}, which is not FP8")
                    if fp8 and rule.linear != "lm_head" and not self.quant.excluded(_module(name)):
                        raise CheckpointError(f"{self.dir}: tensor {name!r} is not FP8 although {self.quant.source} "
                                              "declares quant_algo FP8 and its module is not in exclude_modules")
                    continue
                if not fp8:
                    said = (f"{self.quant.source} declares quant_algo {self.quant.quant_algo!r}"
                            if self.quant.source != "none" else
                            f"neither {HF_QUANT_CONFIG} nor config.json's quantization_config declares FP8")
                    raise CheckpointError(f"{self.dir}: tensor {name!r} is FP8 but {said}")
                if self.quant.excluded(_module(name)):
                    raise CheckpointError(f"{self.dir}: tensor {name!r} is FP8 but its module is in exclude_modules "
                                          f"of {self.quant.source}")
                missing = [n for n in scales.values() if n not in self.reader]
                if missing:
                    raise CheckpointError(f"{self.dir}: FP8 tensor {name!r} needs {missing[0]!r} (static per-tensor "
                                          "scales, as ModelOpt's FP8 export writes them)")
                quantized.append((name, _scalar(self.reader, scales["weight_scale"]),
                                  _scalar(self.reader, scales["input_scale"])))
                seen.add(name)
            if quantized and len(quantized) != len(members):
                raise CheckpointError(f"{self.dir}: {[n for _r, n in members]} run as one GEMM; all or none of them "
                                      "must be FP8")
            if quantized:
                w = torch.stack([q[1] for q in quantized]).max()
                a = torch.stack([q[2] for q in quantized]).max()
                rescale = {n: s for n, s, _a in quantized if float(s) != float(w)}
                if rescale:
                    log.info("re-quantizing %s to the fused group's weight scale %.3g", sorted(rescale), float(w))
                for rule, _name in members:
                    self.linears[(glob, rule.linear)] = _Fp8Linear(w, a, rescale)
        stray = [n for n in self.reader.names() if n not in seen and self.reader.dtype(n) == FP8_DTYPE]
        if stray:
            raise CheckpointError(f"{self.dir}: tensor {stray[0]!r} is FP8 but is not a quantizable linear weight "
                                  "(embedding, norms and scales stay in a 16/32-bit dtype)")
        self._check_kv()

    def _check_kv(self) -> None:
        kv = self.quant.kv_cache_quant_algo == "FP8"
        for i, layer in enumerate(self.spec.layers):
            names = [t.format(l=i) for t in HF_KV_SCALES]
            present = [n for n in names if n in self.reader]
            self.scale_names.update(present)
            if not layer.has_kv_cache or not kv:
                if present:
                    raise CheckpointError(f"{self.dir}: {present[0]!r} is a KV-cache scale but "
                                          + (f"layer {i} has no KV cache" if kv else
                                             f"{self.quant.source} declares no FP8 KV cache"))
                continue
            missing = [n for n in names if n not in self.reader]
            if missing:
                raise CheckpointError(f"{self.dir}: {missing[0]!r} is missing ({self.quant.source} declares "
                                      "kv_cache_quant_algo FP8)")
            self.kv[i] = torch.stack([_scalar(self.reader, n) for n in names]).max()

    # ---- reading ---------------------------------------------------------------------------------------------
    def _read(self, rescale: dict[str, torch.Tensor], group_scale: torch.Tensor | None):
        target = getattr(torch, self.dtype)

        def read(name: str, dim: int, start: int, stop: int) -> torch.Tensor:
            t = self.reader.read(name, dim, start, stop)
            if name in rescale:  # the PyTorch backend's rescale: FP8 -> model dtype, * own / max, -> FP8
                t = (t.to(target) * rescale[name].to(target)).div(group_scale.to(target)).to(FP8_DTYPE)
            return t
        return read

    def load(self) -> TrtllmCheckpoint:
        quantization = default_quantization()
        if self.linears:
            plain = [rule.trt_name(glob).removesuffix(".weight") for _p, rule, glob in self.plan
                     if rule.linear and (glob, rule.linear) not in self.linears]
            quantization.update(quant_algo="FP8", exclude_modules=plain)
        if self.kv:
            quantization["kv_cache_quant_algo"] = "FP8"
        cfg = trtllm_config(self.spec, ConvertOptions(self.dtype), self.dtype, quantization)
        tensors: dict[str, torch.Tensor] = {}
        for planned, rule, glob in self.plan:
            lin = self.linears.get((glob, rule.linear)) if rule.linear else None
            read = self._read(lin.rescale if lin else {}, lin.weight_scale if lin else None)
            t = assemble(list(planned.pieces), read)
            if t.dtype != FP8_DTYPE and t.dtype != getattr(torch, self.dtype):
                t = t.to(getattr(torch, self.dtype))
            tensors[planned.name] = t
            prefix = planned.name.removesuffix("weight")
            if lin is not None:
                for hf_suffix, trt_suffix in HF_FP8_SCALES.items():
                    value = lin.weight_scale if hf_suffix == "weight_scale" else lin.input_scale
                    tensors[prefix + trt_suffix] = value.reshape(1).clone()
            if rule.linear == "attention.qkv" and glob in self.kv:
                tensors[prefix.removesuffix("qkv.") + KV_SCALE] = self.kv[glob].reshape(1).clone()
        log.info("read %s (%d layers, quant %s from %s)", self.dir, self.spec.num_layers, self.quant.quant_algo,
                 self.quant.source)
        return TrtllmCheckpoint(cfg, self.spec, tensors)


def load_hf_checkpoint(model_dir: str | Path, allow_external: bool = False) -> TrtllmCheckpoint:
    """An HF dir (BF16/FP32, or ModelOpt unified FP8) as the unsharded TensorRT-LLM-named checkpoint of tp 1."""
    return HfLoader(model_dir, allow_external).load()

