"""``nasrt eval perplexity``: quality of a checkpoint on held-out text, with the reference runtime."""

from __future__ import annotations

import argparse
from pathlib import Path

from nasrt.errors import ConfigError

HELP = "evaluate a checkpoint with the reference runtime (perplexity on held-out text)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="metric", required=True)
    ppl = sub.add_parser("perplexity", help="perplexity of a text (default: held-out pydoc_data text, offline)")
    ppl.add_argument("--checkpoint_dir", required=True, help="TensorRT-LLM checkpoint written by nasrt")
    ppl.add_argument("--tokenizer_dir", help="HF tokenizer directory (default: the checkpoint dir)")
    ppl.add_argument("--text", help="UTF-8 text file (default: nasrt.textdata.eval_text())")
    ppl.add_argument("--max_chars", type=int, default=None, help="score only the first N characters")
    ppl.add_argument("--max_seq_len", type=int, default=512)
    ppl.add_argument("--stride", type=int, default=None, help="window step (default: max_seq_len)")
    ppl.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ppl.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    from nasrt.eval import perplexity
    from nasrt.runtime import load_model
    from nasrt.runtime.text import check_vocab, load_tokenizer
    from nasrt.textdata import eval_text

    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise ConfigError(f"--text {path}: file not found")
        text = path.read_text(encoding="utf-8")
    else:
        text = eval_text()
    if args.max_chars:
        text = text[: args.max_chars]
    tokenizer = load_tokenizer(args.tokenizer_dir or args.checkpoint_dir)
    model = load_model(args.checkpoint_dir, device=args.device, dtype=args.dtype)
    check_vocab(tokenizer, model.spec)
    ppl = perplexity(model, tokenizer, text, max_seq_len=args.max_seq_len, stride=args.stride)
    print(f"perplexity {ppl:.4f} ({args.checkpoint_dir}, {len(text)} characters"
          f"{', ' + args.text if args.text else ', held-out pydoc_data text'})")
    return 0
