"""``nasrt derive``: a Nemotron-NAS model from a dense Llama (Puzzle: block library, replace-one KL, MIP)."""

from __future__ import annotations

import argparse

from nasrt.derive.library import DEFAULT_FFN_RATIOS, Target
from nasrt.derive.pipeline import MAX_BLD_STEPS, DeriveOptions

HELP = ("derive a heterogeneous nemotron-nas model from an HF Llama / DeciLM on a CPU (block library, "
        "replace-one KL scoring, MIP search)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_dir", required=True, help="parent HF model directory (Llama or nemotron-nas)")
    p.add_argument("--output_dir", required=True, help="HF nemotron-nas directory to write")
    p.add_argument("--budget", default="params=0.85,kv=0.6",
                   help="fractions of the parent: params=F,kv=F[,time=F] (time = modelled decode step)")
    p.add_argument("--no_linear", action="store_true",
                   help="no replace_with_linear blocks (what vLLM / SGLang can also load)")
    p.add_argument("--ffn_ratios", default=",".join(str(r) for r in DEFAULT_FFN_RATIOS),
                   help="FFN narrowing ratios, rounded to widths a DeciLM ffn_mult expresses")
    p.add_argument("--tp", type=int, default=1,
                   help="the derived model must shard at this tensor-parallel size (FFN widths, KV heads)")
    p.add_argument("--calib_dataset", default=None,
                   help="text / JSONL / parquet file (default: CPython's bundled documentation, offline)")
    p.add_argument("--calib_size", type=int, default=32, help="fitting sequences")
    p.add_argument("--calib_seq_len", type=int, default=128, help="tokens per fitting sequence")
    p.add_argument("--score_size", type=int, default=8, help="held-out calibration sequences for the KL scores")
    p.add_argument("--score_seq_len", type=int, default=64, help="tokens per scoring sequence")
    p.add_argument("--eval_chars", type=int, default=6000,
                   help="characters of held-out text for the perplexity report (0: skip)")
    p.add_argument("--eval_seq_len", type=int, default=256)
    p.add_argument("--bld_steps", type=int, default=0,
                   help=f"block-wise local distillation steps per candidate (0..{MAX_BLD_STEPS})")
    p.add_argument("--bld_lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=8, help="target batch of the modelled decode-step time")
    p.add_argument("--seq", type=int, default=4096, help="target context of the modelled decode-step time")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the written weights (auto: the parent's)")
    p.add_argument("--tokenizer_dir", default=None, help="tokenizer directory (default: --model_dir)")
    p.add_argument("--no_plot", action="store_true", help="do not write derive_report.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir atomically")


def parse_ratios(text: str) -> tuple[float, ...]:
    from nasrt.errors import ConfigError

    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--ffn_ratios {text!r}: not a comma-separated list of numbers") from None


def options(args: argparse.Namespace) -> DeriveOptions:
    from nasrt.derive.search import parse_budget

    return DeriveOptions(budget=parse_budget(args.budget), ffn_ratios=parse_ratios(args.ffn_ratios),
                         no_linear=args.no_linear, tp=args.tp, calib_dataset=args.calib_dataset,
                         calib_size=args.calib_size, calib_seq_len=args.calib_seq_len, score_size=args.score_size,
                         score_seq_len=args.score_seq_len, eval_chars=args.eval_chars,
                         eval_seq_len=args.eval_seq_len, bld_steps=args.bld_steps, bld_lr=args.bld_lr,
                         dtype=args.dtype, target=Target(args.batch, args.seq), tokenizer_dir=args.tokenizer_dir,
                         plot=not args.no_plot)


def run(args: argparse.Namespace) -> int:
    from nasrt.derive import derive

    res = derive(args.model_dir, args.output_dir, options(args), overwrite=args.overwrite)
    print(res.table)
    return 0
