"""What TensorRT-LLM 1.2-1.4's LLM API accepts, as declarative tables, and a validator for the YAML nasrt writes.

Source: ``shared/reference/triton-trtllm.md`` sections 7 and 8b (``BaseLlmArgs`` / ``TorchLlmArgs``, pydantic
``extra="forbid"``: an unknown key is an error when ``trtllm-serve --config`` or ``LLM(**kwargs)`` reads it). Only the
arguments nasrt writes or documents are listed; a key outside these tables is refused here, before a GPU sees it.
The KV-cache dtype is ``kv_cache_config.dtype``; a top-level ``kv_cache_dtype`` is rejected by the LLM API.
"""

from __future__ import annotations

from typing import Any

from nasrt.config_schema import show
from nasrt.errors import ConfigError

#: ``KvCacheConfig`` fields.
KV_CACHE_CONFIG: dict[str, type | tuple[type, ...]] = {
    "free_gpu_memory_fraction": float, "max_tokens": int, "max_gpu_total_bytes": int, "enable_block_reuse": bool,
    "dtype": str, "tokens_per_block": int, "host_cache_size": int,
}
#: ``CudaGraphConfig`` fields.
CUDA_GRAPH_CONFIG: dict[str, type | tuple[type, ...]] = {"batch_sizes": list, "max_batch_size": int,
                                                         "enable_padding": bool}
#: ``kv_cache_config.dtype`` values nasrt writes (``auto``: the checkpoint's ``kv_cache_quant_algo``, else the model
#: dtype).
KV_CACHE_DTYPES = ("auto", "fp8")
#: Top-level LLM-API arguments (``TorchLlmArgs``); a nested table for the config objects.
LLM_ARGS: dict[str, Any] = {
    "model": str, "backend": str, "tensor_parallel_size": int, "pipeline_parallel_size": int,
    "trust_remote_code": bool, "dtype": str, "max_batch_size": int, "max_num_tokens": int, "max_seq_len": int,
    "max_input_len": int, "enable_chunked_prefill": bool, "kv_cache_config": KV_CACHE_CONFIG,
    "cuda_graph_config": CUDA_GRAPH_CONFIG, "scheduler_config": dict, "speculative_config": dict,
}
#: ``trtllm-serve --config`` (= ``--extra_llm_api_options``): the model is the positional argument, not a key.
SERVE_YAML_ARGS = {k: v for k, v in LLM_ARGS.items() if k != "model"}
#: Triton llmapi ``1/model.yaml``: LLM() arguments plus the reserved ``triton_config`` block read by its model.py.
TRITON_CONFIG: dict[str, type | tuple[type, ...]] = {"max_batch_size": int, "decoupled": bool,
                                                     "cancellation_check_period_ms": int}
MODEL_YAML_ARGS = {**LLM_ARGS, "triton_config": TRITON_CONFIG}
#: Keys users commonly try that the LLM API rejects, with what to write instead.
HINTS = {"kv_cache_dtype": "kv_cache_config.dtype", "free_gpu_memory_fraction": "kv_cache_config.free_gpu_memory_fraction",
         "tp_size": "tensor_parallel_size", "pp_size": "pipeline_parallel_size"}


def _check_value(value: Any, kind: Any, path: str, where: str) -> None:
    if isinstance(kind, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {path} = {show(value)} must be a mapping")
        check_args(value, kind, where, prefix=f"{path}.")
        return
    ok = (type(value) is bool) if kind is bool else (
        isinstance(value, (int, float)) and type(value) is not bool if kind is float else
        type(value) is int if kind is int else isinstance(value, kind))
    if not ok:
        raise ConfigError(f"{where}: {path} = {show(value)} must be {getattr(kind, '__name__', kind)}")


def check_args(args: dict[str, Any], table: dict[str, Any] = SERVE_YAML_ARGS, where: str = "LLM-API options",
               prefix: str = "") -> None:
    """Every key of ``args`` is an argument of ``table`` (recursively) with a value of its type; else a
    :class:`ConfigError` naming the key, as the LLM API's ``extra="forbid"`` would refuse it."""
    for key, value in args.items():
        path = prefix + str(key)
        if key not in table:
            hint = f"; write {HINTS[key]}" if not prefix and key in HINTS else ""
            raise ConfigError(f"{where}: {path!r} is not an LLM-API argument of TensorRT-LLM 1.2-1.4 "
                              f"(extra='forbid' rejects it){hint}")
        _check_value(value, table[key], path, where)
    kv = args.get("kv_cache_config") if not prefix else None
    if isinstance(kv, dict) and kv.get("dtype") is not None and kv["dtype"] not in KV_CACHE_DTYPES:
        raise ConfigError(f"{where}: kv_cache_config.dtype = {show(kv['dtype'])} must be one of "
                          f"{', '.join(KV_CACHE_DTYPES)}")
