"""``nasrt convert`` / ``convert_checkpoint.py``: HF DeciLM -> TensorRT-LLM checkpoint."""

from __future__ import annotations

import argparse

from nasrt.convert import ConvertOptions, convert_checkpoint

HELP = "convert an HF DeciLM / Llama checkpoint into a TensorRT-LLM DeciLMForCausalLM checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_dir", required=True, help="HF model directory (config.json + *.safetensors)")
    p.add_argument("--output_dir", required=True, help="TensorRT-LLM checkpoint directory to write")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--tp_size", type=int, default=1)
    p.add_argument("--pp_size", type=int, default=1)
    p.add_argument("--use_parallel_embedding", action="store_true")
    p.add_argument("--embedding_sharding_dim", type=int, default=0, choices=[0, 1])
    p.add_argument("--workers", type=int, default=1, help="convert this many ranks in parallel")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir atomically")
    p.add_argument("--allow_external_files", action="store_true",
                   help="read weight files whose symlinks resolve outside --model_dir (refused by default)")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="accepted for TensorRT-LLM compatibility; nasrt never runs remote code")


def run(args: argparse.Namespace) -> int:
    opts = ConvertOptions(args.dtype, args.tp_size, args.pp_size, args.use_parallel_embedding,
                          args.embedding_sharding_dim)
    out = convert_checkpoint(args.model_dir, args.output_dir, opts, workers=args.workers, overwrite=args.overwrite,
                             allow_external=args.allow_external_files)
    print(f"wrote TensorRT-LLM checkpoint {out}")
    return 0
