"""``nasrt triton``: write a Triton model repository for an engine (or the CPU reference variant) and print how to
launch it; ``--serve`` starts the reference variant on a local Triton server."""

from __future__ import annotations

import argparse
import math
import signal
import time

from nasrt.deploy.triton.launch import format_command, launch_command, launch_script_command
from nasrt.deploy.triton.repository import (
    ServingOptions,
    read_engine,
    write_engine_repository,
    write_reference_repository,
)
from nasrt.deploy.triton.server import DEFAULT_READY_TIMEOUT_S, check_ports
from nasrt.errors import ConfigError

HELP = "write a Triton Inference Server model repository (ensemble, pre/post-processing, tensorrt_llm)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine_dir", help="TensorRT-LLM engine dir (config.json + rank*.engine)")
    p.add_argument("--reference", action="store_true",
                   help="CPU variant: tensorrt_llm answered by nasrt's reference runtime from --checkpoint_dir")
    p.add_argument("--checkpoint_dir", help="with --reference: nasrt / TensorRT-LLM checkpoint dir")
    p.add_argument("--tokenizer_dir", help="HF tokenizer dir (loaded by pre- and postprocessing; engine and "
                   "--reference checkpoint variants; required there)")
    p.add_argument("--output_dir", required=True, help="model repository to write")
    p.add_argument("--max_batch_size", type=int,
                   help="Triton max_batch_size (default: the engine's build-time value; reference: 4)")
    p.add_argument("--max_seq_len", type=int, help="with --reference: prompt + output limit "
                   "(default: max_position_embeddings)")
    p.add_argument("--device", default="cpu", help="with --reference: torch device of the reference runtime")
    p.add_argument("--kv_cache_free_gpu_mem_fraction", type=float, default=0.9)
    p.add_argument("--max_tokens_in_paged_kv_cache", type=int)
    p.add_argument("--batch_scheduler_policy", default="guaranteed_no_evict",
                   choices=["guaranteed_no_evict", "max_utilization"])
    p.add_argument("--enable_kv_cache_reuse", action="store_true")
    p.add_argument("--no_decoupled", action="store_true",
                   help="non-decoupled tensorrt_llm (no streaming; default is decoupled)")
    p.add_argument("--include_input_in_output", action="store_true",
                   help="echo the prompt in output_ids (default: exclude_input_in_output)")
    p.add_argument("--preprocessing_instances", type=int, default=1)
    p.add_argument("--postprocessing_instances", type=int, default=1)
    p.add_argument("--http_port", type=int, default=8000, help="port in the printed launch command / for --serve")
    p.add_argument("--grpc_port", type=int, default=8001)
    p.add_argument("--metrics_port", type=int, default=8002)
    p.add_argument("--serve", action="store_true",
                   help="with --reference: start the repository on a local Triton server (nvidia-pytriton) "
                        "on 127.0.0.1 until Ctrl-C")
    p.add_argument("--serve_timeout", type=float, default=DEFAULT_READY_TIMEOUT_S,
                   help="with --serve: seconds to wait for the server to be ready (progress is logged meanwhile)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir atomically")
    pt = p.add_argument_group("--backend pytorch: the llmapi repository (TensorRT-LLM's PyTorch backend)")
    pt.add_argument("--backend", choices=["engine", "pytorch"], default="engine",
                    help="engine: ensemble repository for a trtllm-build engine (default); pytorch: the llmapi "
                         "repository serving --model_dir with the LLM API")
    pt.add_argument("--model_dir", help="HF DeciLM / Llama dir or ModelOpt unified FP8 checkpoint")
    pt.add_argument("--llmapi_source", help="TensorRT-LLM checkout (or its llmapi tensorrt_llm/1 dir) whose model.py "
                    "is linked into the repository (default: found next to an installed tensorrt_llm)")
    pt.add_argument("--gpu", default="h100-80gb", help="GPU kind the LLM() arguments are planned for")
    pt.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    pt.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "fp8"], help="kv_cache_config.dtype")
    pt.add_argument("--max_num_tokens", type=int, default=8192)
    pt.add_argument("--force", action="store_true", help="write the repository even if the plan does not fit")


def _options(args: argparse.Namespace) -> ServingOptions:
    return ServingOptions(max_batch_size=args.max_batch_size, decoupled=not args.no_decoupled,
                          kv_cache_free_gpu_mem_fraction=args.kv_cache_free_gpu_mem_fraction,
                          max_tokens_in_paged_kv_cache=args.max_tokens_in_paged_kv_cache,
                          batch_scheduler_policy=args.batch_scheduler_policy,
                          enable_kv_cache_reuse=args.enable_kv_cache_reuse,
                          exclude_input_in_output=not args.include_input_in_output,
                          preprocessing_instances=args.preprocessing_instances,
                          postprocessing_instances=args.postprocessing_instances)


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


def _serve(repo, args: argparse.Namespace, llmapi: bool = False) -> None:
    from nasrt.deploy.triton.llmapi import query_hint
    from nasrt.deploy.triton.server import LocalTritonServer

    # SIGTERM (and SIGINT, even where a background shell ignored it) stops the server cleanly.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    with LocalTritonServer(repo, http_port=args.http_port, grpc_port=args.grpc_port,
                           metrics_port=args.metrics_port, ready_timeout=args.serve_timeout) as server:
        print(f"Triton is serving {repo} at {server.url} (log {server.log_path}); Ctrl-C stops it")
        if llmapi:  # no ensemble here: tensorrt_llm takes text itself
            print(f"try: {query_hint(server.url)}", flush=True)
        else:
            print(f"try: nasrt client --url {server.url} --chat --text 'What is the capital of France?'", flush=True)
        try:
            while server.running:
                time.sleep(1)
        except KeyboardInterrupt:
            print("stopping Triton")
            return
        print(f"tritonserver exited:\n{server.log_tail()}")


def run(args: argparse.Namespace) -> int:
    ports = {"http_port": args.http_port, "grpc_port": args.grpc_port, "metrics_port": args.metrics_port}
    check_ports({f"--{k}": v for k, v in ports.items()})  # before anything is written
    if not (math.isfinite(args.serve_timeout) and args.serve_timeout > 0):
        raise ConfigError(f"--serve_timeout {args.serve_timeout} must be a number of seconds > 0")
    if args.backend == "pytorch":
        return _run_pytorch(args)
    if not args.tokenizer_dir:
        raise ConfigError("--tokenizer_dir is required (the pre- and postprocessing models load it)")
    opts = _options(args)
    if args.reference:
        if not args.checkpoint_dir or args.engine_dir:
            raise ConfigError("--reference needs --checkpoint_dir (a nasrt checkpoint), not --engine_dir")
        repo = write_reference_repository(args.checkpoint_dir, args.tokenizer_dir, args.output_dir, opts,
                                          max_seq_len=args.max_seq_len, device=args.device,
                                          overwrite=args.overwrite)
        print(f"wrote reference (CPU) Triton model repository {repo}")
        print("launch on this machine: nasrt triton --reference ... --serve, or with a Triton that has the "
              f"Python backend: {format_command(launch_command(repo, 1, tritonserver='tritonserver', **ports))}")
        if args.serve:
            _serve(repo, args)
        return 0
    if not args.engine_dir:
        raise ConfigError("pass --engine_dir (a TensorRT-LLM engine), or --reference --checkpoint_dir for the CPU "
                          "variant")
    if args.serve:
        raise ConfigError("--serve runs only --reference repositories (the local Triton has no tensorrtllm "
                          "backend); launch engine repositories in the Triton TRT-LLM container")
    if args.max_seq_len is not None:
        raise ConfigError("--max_seq_len applies to --reference only; an engine's limit is fixed at build time")
    engine = read_engine(args.engine_dir)
    repo = write_engine_repository(engine.engine_dir, args.tokenizer_dir, args.output_dir, opts,
                                   overwrite=args.overwrite)
    print(f"wrote Triton model repository {repo} (engine {engine.engine_dir}, world size {engine.world_size})")
    print("launch (Triton TensorRT-LLM container, TensorRT-LLM version = the engine's):")
    print(f"  {format_command(launch_command(repo, engine.world_size, **ports))}")
    print(f"  or: {format_command(launch_script_command(repo, engine.world_size))}")
    print(f"query: nasrt client --url http://127.0.0.1:{args.http_port} --text 'What is the capital of France?'")
    return 0


def _run_pytorch(args: argparse.Namespace) -> int:
    """``--backend pytorch``: the llmapi repository (``--reference``: answered by the reference runtime)."""
    from nasrt.deploy.pytorch.serve_config import ServeRequest
    from nasrt.deploy.triton.llmapi import write_llmapi_repository

    if not args.model_dir or args.engine_dir or args.checkpoint_dir:
        raise ConfigError("--backend pytorch serves --model_dir (an HF or ModelOpt FP8 checkpoint dir), not "
                          "--engine_dir / --checkpoint_dir")
    req = ServeRequest(gpu=args.gpu, tp=args.tp, kv_cache_dtype=args.kv_cache_dtype, batch=args.max_batch_size,
                       seq=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                       kv_fraction=args.kv_cache_free_gpu_mem_fraction)
    repo = write_llmapi_repository(args.model_dir, args.output_dir, req, reference=args.reference,
                                   llmapi_source=args.llmapi_source, decoupled=not args.no_decoupled,
                                   force=args.force, overwrite=args.overwrite)
    print(f"wrote llmapi Triton model repository {repo.path}"
          + (" (reference: answered by nasrt's CPU runtime)" if args.reference else ""))
    if repo.model_source is not None:
        print(f"linked TensorRT-LLM's model code from {repo.model_source}")
    for line in repo.instructions:
        print(line)
    if args.serve:
        if not args.reference:
            raise ConfigError("--serve runs only --reference repositories (the local Triton has no TensorRT-LLM)")
        _serve(repo.path, args, llmapi=True)
    return 0
