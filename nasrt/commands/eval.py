"""``nasrt eval perplexity``: quality of a checkpoint on held-out text, with the reference runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from nasrt.errors import ConfigError

HELP = "evaluate a checkpoint with the reference runtime (perplexity on held-out text)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="metric", required=True)
    ppl = sub.add_parser("perplexity", help="perplexity of a text (default: held-out pydoc_data text, offline)")
    src = ppl.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint_dir", help="TensorRT-LLM checkpoint written by nasrt")
    src.add_argument("--model_dir", help="HF DeciLM / Llama dir or ModelOpt unified FP8 checkpoint (what TensorRT-LLM's "
                     "PyTorch backend loads)")
    ppl.add_argument("--tokenizer_dir", help="HF tokenizer directory (default: the checkpoint dir)")
    ppl.add_argument("--text", help="UTF-8 text file (default: nasrt.textdata.eval_text())")
    ppl.add_argument("--max_chars", type=int, default=None, help="score only the first N characters")
    ppl.add_argument("--max_seq_len", type=int, default=512)
    ppl.add_argument("--stride", type=int, default=None, help="window step (default: max_seq_len)")
    ppl.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ppl.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ppl.add_argument("--allow_external_files", action="store_true",
                     help="read rank files whose symlinks resolve outside --checkpoint_dir (refused by default)")


def run(args: argparse.Namespace) -> int:
    from nasrt.eval import perplexity
    from nasrt.runtime import load_model
    from nasrt.runtime.text import check_vocab, load_tokenizer
    from nasrt.textdata import eval_text

    if args.max_chars is not None and args.max_chars < 1:
        raise ConfigError(f"--max_chars {args.max_chars} must be >= 1")
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise ConfigError(f"--text {path}: file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--text {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    else:
        text = eval_text()
    if args.max_chars is not None:
        text = text[: args.max_chars]
    src_dir = args.model_dir or args.checkpoint_dir
    tokenizer = load_tokenizer(args.tokenizer_dir or src_dir)
    model = load_model(src_dir, device=args.device, dtype=args.dtype,
                       allow_external=args.allow_external_files)
    check_vocab(tokenizer, model.spec)
    ppl = perplexity(model, tokenizer, text, max_seq_len=args.max_seq_len, stride=args.stride)
    print(f"perplexity {ppl:.4f} ({src_dir}, {len(text)} characters"
          f"{', ' + args.text if args.text else ', held-out pydoc_data text'})")
    return 0
