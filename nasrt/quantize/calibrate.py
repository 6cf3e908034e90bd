"""The ModelOpt side shared by layer-wise and whole-model calibration: the FP8 config, K/V quantizer
registration for nasrt blocks, and reading the calibrated amax values back by HF module name."""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from nasrt.errors import ConfigError

log = logging.getLogger(__name__)

SUPPORTED_QFORMATS = ("fp8",)
SUPPORTED_KV_DTYPES = ("fp8",)

#: HF module name -> {"weight" | "input" | "k" | "v": amax (float32 scalar tensor)}
AmaxTable = dict[str, dict[str, torch.Tensor]]

_QUANTIZERS = {"weight_quantizer": "weight", "input_quantizer": "input", "k_bmm_quantizer": "k",
               "v_bmm_quantizer": "v"}


def mtq():
    """Import ModelOpt's quantization API (slow, so only when calibrating), quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as _mtq
    return _mtq


@dataclass(frozen=True)
class QuantSettings:
    """What to quantize: the ``--qformat`` / ``--kv_cache_dtype`` / ``--quantize_lm_head`` flags, and the linears
    kept in the checkpoint dtype (``--bf16_budget``): TensorRT-LLM module names in ``exclude`` and the HF module
    names behind them in ``hf_exclude``."""

    qformat: str = "fp8"
    kv_cache_dtype: str | None = None
    quantize_lm_head: bool = False
    exclude: tuple[str, ...] = ()
    hf_exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.qformat not in SUPPORTED_QFORMATS:
            raise ConfigError(f"--qformat {self.qformat!r} is not supported; supported: {list(SUPPORTED_QFORMATS)}")
        if self.kv_cache_dtype not in (None, *SUPPORTED_KV_DTYPES):
            raise ConfigError(f"--kv_cache_dtype {self.kv_cache_dtype!r} is not supported; supported: "
                              f"{list(SUPPORTED_KV_DTYPES)}")

    @property
    def kv(self) -> bool:
        return self.kv_cache_dtype == "fp8"


def quant_config(settings: QuantSettings) -> dict:
    """ModelOpt's ``FP8_DEFAULT_CFG`` (+ ``FP8_KV_CFG`` entries; minus the ``*lm_head*`` exclusion on request)."""
    m = mtq()
    cfg = copy.deepcopy(m.FP8_DEFAULT_CFG)
    if settings.kv:
        cfg["quant_cfg"] += copy.deepcopy(m.FP8_KV_CFG["quant_cfg"])
    if settings.quantize_lm_head:
        cfg["quant_cfg"] = [e for e in cfg["quant_cfg"] if e.get("quantizer_name") != "*lm_head*"]
    return cfg


_REGISTERED = False


def register_attention() -> None:
    """Give transformers' ``LlamaAttention`` ModelOpt's K/V-quantizing HF attention wrapper.

    ModelOpt does this itself only for ``PreTrainedModel`` instances; nasrt blocks are plain modules, so it is done
    here once, with the same wrapper class (so whole-model HF runs use the identical code path).
    """
    global _REGISTERED
    if _REGISTERED:
        return
    mtq()
    from modelopt.torch.quantization.conversion import register
    from modelopt.torch.quantization.nn import QuantModuleRegistry
    from modelopt.torch.quantization.plugins.huggingface import _QuantAttention
    from transformers.models.llama.modeling_llama import LlamaAttention

    if QuantModuleRegistry.get(LlamaAttention) is None:
        register(LlamaAttention, _QuantAttention)
    _REGISTERED = True


def quantize_module(module: nn.Module, settings: QuantSettings, forward_loop) -> nn.Module:
    """``mtq.quantize`` with the FP8 config; ModelOpt's progress prints are silenced."""
    register_attention()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mtq().quantize(module, quant_config(settings), forward_loop)


def collect_amax(module: nn.Module, prefix: str = "") -> AmaxTable:
    """Every enabled quantizer's amax, keyed by the HF name of the module that owns it (``prefix`` prepended)."""
    table: AmaxTable = {}
    for name, sub in module.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in _QUANTIZERS or not getattr(sub, "is_enabled", False):
            continue
        amax = getattr(sub, "amax", None)
        if amax is None:
            continue
        owner = prefix + name.rsplit(".", 1)[0] if "." in name else prefix.rstrip(".")
        table.setdefault(owner, {})[_QUANTIZERS[leaf]] = amax.detach().float().reshape(()).cpu().clone()
    return table
