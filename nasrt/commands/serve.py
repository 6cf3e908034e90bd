"""``nasrt serve``: the OpenAI-compatible API of ``trtllm-serve`` (``/v1/models``, ``/v1/completions``,
``/v1/chat/completions``, ``/health``) over nasrt's reference runtime, with continuous batching."""

from __future__ import annotations

import argparse

from nasrt.deploy.serve.server import ServeOptions, load_served_model, serve_forever

HELP = "serve a checkpoint with the OpenAI-compatible API of trtllm-serve (reference runtime, CPU or CUDA)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (exactly one)")
    src.add_argument("--model_dir", help="HF DeciLM / Llama dir, BF16 or ModelOpt unified FP8 (what trtllm-serve "
                     "loads)")
    src.add_argument("--checkpoint_dir", help="nasrt / TensorRT-LLM checkpoint dir")
    p.add_argument("--tokenizer_dir", help="HF tokenizer dir (default: the model / checkpoint dir)")
    p.add_argument("--served_model_name", help="the model name clients send (default: the dir's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together at most")
    p.add_argument("--max_seq_len", type=int, help="prompt + output limit (default: max_position_embeddings)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--allow_external_files", action="store_true",
                   help="read weight files whose symlinks resolve outside the model dir (refused by default)")


def run(args: argparse.Namespace) -> int:
    opts = ServeOptions(model_dir=args.model_dir, checkpoint_dir=args.checkpoint_dir,
                        tokenizer_dir=args.tokenizer_dir, served_model_name=args.served_model_name,
                        host=args.host, port=args.port, max_batch_size=args.max_batch_size,
                        max_seq_len=args.max_seq_len, device=args.device, dtype=args.dtype,
                        allow_external=args.allow_external_files)
    opts.check()  # before loading anything
    opts.check_address()
    served = load_served_model(opts)
    print(f"serving {served.name} at http://{opts.host}:{opts.port}/v1 (OpenAI API; Ctrl-C stops)", flush=True)
    serve_forever(served, opts.host, opts.port)
    return 0
