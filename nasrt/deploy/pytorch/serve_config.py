"""``trtllm-serve`` for the PyTorch backend: the ``--config`` YAML sized by the planner, and the launch command.

Every value comes from one :func:`nasrt.deploy.plan.plan_memory` run with ``backend="pytorch"``:
``max_batch_size`` / ``cuda_graph_config.max_batch_size`` = the planned batch, ``max_seq_len`` = the planned
sequence (always explicit: the config's ``max_position_embeddings``, 131072 for Nemotron, is what OOMs), ``max_num_tokens``
= the planned tokens in flight (activations), ``kv_cache_config`` = the planned fraction, block size and (FP8 KV)
``dtype: fp8``, ``enable_chunked_prefill`` = whether a full-length prompt exceeds ``max_num_tokens``. The keys are
checked against the pinned LLM-API table (:mod:`nasrt.deploy.pytorch.llm_api`) before anything is written.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nasrt.arch import ModelSpec, from_hf_config, read_json
from nasrt.atomic import atomic_output_dir, check_not_input, write_json
from nasrt.deploy.plan import Plan, PlanRequest, plan_memory, render
from nasrt.deploy.pytorch.llm_api import SERVE_YAML_ARGS, check_args
from nasrt.errors import ConfigError

log = logging.getLogger(__name__)

YAML_NAME = "trtllm-serve.yaml"
PLAN_NAME = "plan.json"
DEFAULT_SEQ = 8192
#: Largest batch chosen when ``--batch`` is not given (the KV cache may hold more sequences).
MAX_DEFAULT_BATCH = 256


@dataclass(frozen=True)
class ServeRequest:
    """What ``nasrt serve-config`` sizes for (None = derived)."""

    gpu: str = "h100-80gb"
    tp: int = 1
    kv_cache_dtype: str = "auto"  # auto: the checkpoint's (FP8 when it has FP8 KV scales), else the model dtype
    batch: int | None = None  # None: the largest batch that fits at seq (at most MAX_DEFAULT_BATCH)
    seq: int | None = None  # None: min(max_position_embeddings, DEFAULT_SEQ)
    max_num_tokens: int = 8192
    kv_fraction: float = 0.9
    tokens_per_block: int = 32


@dataclass
class ServeConfig:
    """The planned deployment: the plan, the YAML arguments and the launch command."""

    plan: Plan
    args: dict[str, Any]
    command: list[str]
    trust_remote_code: bool


def model_facts(model_dir: str | Path) -> tuple[ModelSpec, str, str, bool]:
    """(spec, weight dtype for the planner, checkpoint KV dtype, needs trust_remote_code) of an HF / FP8 dir."""
    from nasrt.hf_ckpt import read_quantization

    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    cfg = read_json(cfg_path)
    if "pretrained_config" in cfg or "layer_configs" in cfg:
        raise ConfigError(f"--model_dir {model_dir}: a TensorRT-LLM checkpoint / engine; the PyTorch backend serves "
                          "the HF dir (or ModelOpt's unified FP8 checkpoint, quantize.py --export_format hf)")
    spec = from_hf_config(cfg, str(cfg_path))
    quant = read_quantization(model_dir, cfg)
    base = spec.torch_dtype if spec.torch_dtype in ("bfloat16", "float16", "float32") else "bfloat16"
    dtype = "fp8" if quant.quant_algo == "FP8" else base
    kv = "fp8" if quant.kv_cache_quant_algo == "FP8" else base
    return spec, dtype, kv, bool(cfg.get("auto_map"))


def plan_request(spec: ModelSpec, dtype: str, ckpt_kv: str, req: ServeRequest) -> PlanRequest:
    """The planner request for the PyTorch backend, with the batch chosen when none was given."""
    if req.kv_cache_dtype not in ("auto", "fp8"):
        raise ConfigError(f"--kv_cache_dtype {req.kv_cache_dtype!r} must be auto or fp8")
    kv = "fp8" if req.kv_cache_dtype == "fp8" else ckpt_kv
    seq = req.seq if req.seq is not None else min(spec.max_position_embeddings, DEFAULT_SEQ)
    if seq > spec.max_position_embeddings:
        raise ConfigError(f"--seq {seq} exceeds the model's max_position_embeddings {spec.max_position_embeddings}")
    base = PlanRequest(gpu=req.gpu, tp=req.tp, pp=1, dtype=dtype, kv_cache_dtype=kv, batch=req.batch or 1, seq=seq,
                       max_num_tokens=req.max_num_tokens, kv_fraction=req.kv_fraction,
                       tokens_per_block=req.tokens_per_block, backend="pytorch")
    if req.batch is not None:
        return base
    first = plan_memory(spec, base)
    cap = MAX_DEFAULT_BATCH if first.max_batch is None else first.max_batch  # None: no KV cache at all
    batch = max(1, min(MAX_DEFAULT_BATCH, cap)) if first.fits else 1
    while batch > 1 and not plan_memory(spec, dataclasses.replace(base, batch=batch)).fits:
        batch -= 1  # the CUDA-graph pool grows with the batch
    return dataclasses.replace(base, batch=batch)


def llm_api_args(plan: Plan) -> dict[str, Any]:
    """The ``--config`` YAML arguments, every one taken from ``plan``'s request."""
    r = plan.request
    kv: dict[str, Any] = {"free_gpu_memory_fraction": r.kv_fraction, "tokens_per_block": r.tokens_per_block}
    if r.kv_dtype == "fp8":
        kv["dtype"] = "fp8"
    args = {
        "tensor_parallel_size": r.tp,
        "pipeline_parallel_size": r.pp,
        "max_batch_size": r.batch,
        "max_seq_len": r.seq,
        "max_num_tokens": r.max_num_tokens,
        "enable_chunked_prefill": r.seq > r.max_num_tokens,
        "kv_cache_config": kv,
        "cuda_graph_config": {"max_batch_size": r.batch, "enable_padding": True},
    }
    check_args(args, SERVE_YAML_ARGS, "trtllm-serve --config")
    return args


def serve_command(model_dir: str | Path, yaml_path: str | Path, tp: int, trust_remote_code: bool,
                  host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """``trtllm-serve DIR --config YAML --tp_size N [--trust_remote_code] --host H --port P``."""
    cmd = ["trtllm-serve", str(model_dir), "--config", str(yaml_path), "--tp_size", str(tp)]
    if trust_remote_code:
        cmd.append("--trust_remote_code")
    return [*cmd, "--host", host, "--port", str(port)]


def plan_serve_config(model_dir: str | Path, req: ServeRequest, output_dir: str | Path, host: str = "127.0.0.1",
                      port: int = 8000) -> ServeConfig:
    """Plan the deployment of ``model_dir`` (nothing written)."""
    spec, dtype, ckpt_kv, remote = model_facts(model_dir)
    plan = plan_memory(spec, plan_request(spec, dtype, ckpt_kv, req))
    if req.kv_cache_dtype == "fp8" and ckpt_kv != "fp8":
        log.warning("--kv_cache_dtype fp8 on a checkpoint without KV-cache scales: the PyTorch backend uses scale 1.0")
    cmd = serve_command(Path(model_dir).resolve(), Path(output_dir).resolve() / YAML_NAME, req.tp, remote, host, port)
    return ServeConfig(plan, llm_api_args(plan), cmd, remote)


def yaml_text(args: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(args, sort_keys=False, default_flow_style=False)


def write_serve_config(model_dir: str | Path, output_dir: str | Path, req: ServeRequest, force: bool = False,
                       overwrite: bool = False, host: str = "127.0.0.1", port: int = 8000) -> ServeConfig:
    """Write ``output_dir/trtllm-serve.yaml`` and ``plan.json`` atomically; a plan that does not fit is refused
    unless ``force``."""
    check_not_input(output_dir, (model_dir,))  # before any work
    sc = plan_serve_config(model_dir, req, output_dir, host, port)
    if not sc.plan.fits:
        if not force:
            raise ConfigError(f"the plan does not fit: {sc.plan.reason} (pass --force to write the config anyway)")
        log.warning("writing a config whose plan does not fit (--force): %s", sc.plan.reason)
    with atomic_output_dir(output_dir, overwrite, inputs=(model_dir,)) as tmp:
        (tmp / YAML_NAME).write_text(yaml_text(sc.args), encoding="utf-8")
        write_json(tmp / PLAN_NAME, {"plan": sc.plan.to_dict(), "report": render(sc.plan),
                                     "command": shlex.join(sc.command), "forced": not sc.plan.fits})
    return sc
