"""``nasrt serve-config``: the ``trtllm-serve --config`` YAML for the PyTorch backend, sized by the planner, and the
launch command."""

from __future__ import annotations

import argparse
import shlex

from nasrt.deploy.plan import GPUS, render

HELP = "write trtllm-serve.yaml (LLM-API options sized by the PyTorch-backend memory plan) and print the command"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_dir", required=True, help="HF DeciLM / Llama dir or ModelOpt unified FP8 checkpoint")
    p.add_argument("--gpu", default="h100-80gb", choices=list(GPUS), help="GPU kind (default h100-80gb)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (trtllm-serve --tp_size)")
    p.add_argument("--kv_cache_dtype", default="auto", choices=["auto", "fp8"],
                   help="KV cache dtype (auto: FP8 when the checkpoint carries FP8 KV scales); written as "
                        "kv_cache_config.dtype")
    p.add_argument("--batch", type=int, help="max_batch_size (default: the largest batch that fits at --seq, "
                   "at most 256)")
    p.add_argument("--seq", type=int, help="max_seq_len, prompt + output (default: min(max_position_embeddings, 8192))")
    p.add_argument("--max_num_tokens", type=int, default=8192, help="tokens per forward (activations)")
    p.add_argument("--kv_fraction", type=float, default=0.9, help="kv_cache_config.free_gpu_memory_fraction")
    p.add_argument("--host", default="127.0.0.1", help="host in the printed trtllm-serve command")
    p.add_argument("--port", type=int, default=8000, help="port in the printed trtllm-serve command")
    p.add_argument("--output_dir", required=True, help="directory to write trtllm-serve.yaml and plan.json into")
    p.add_argument("--force", action="store_true", help="write the config even if the plan does not fit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")


def run(args: argparse.Namespace) -> int:
    from nasrt.deploy.pytorch.serve_config import YAML_NAME, ServeRequest, write_serve_config, yaml_text

    req = ServeRequest(gpu=args.gpu, tp=args.tp, kv_cache_dtype=args.kv_cache_dtype, batch=args.batch, seq=args.seq,
                       max_num_tokens=args.max_num_tokens, kv_fraction=args.kv_fraction)
    sc = write_serve_config(args.model_dir, args.output_dir, req, force=args.force, overwrite=args.overwrite,
                            host=args.host, port=args.port)
    print(render(sc.plan))
    print(f"wrote {args.output_dir}/{YAML_NAME}:")
    print(yaml_text(sc.args), end="")
    print("launch (TensorRT-LLM 1.2+ with the PyTorch backend):")
    print(f"  {shlex.join(sc.command)}")
    return 0  # a plan that does not fit was refused above unless --force
