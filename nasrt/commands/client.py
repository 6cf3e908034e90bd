"""``nasrt client``: send a prompt to a Triton ensemble's generate endpoint and print ``text_output``."""

from __future__ import annotations

import argparse
import sys

from nasrt.deploy.triton.client import check_endpoint, generate

HELP = "query a Triton model repository (POST /v2/models/ensemble/generate[_stream]) and print text_output"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="Triton HTTP endpoint")
    p.add_argument("--text", required=True, help="prompt (text_input)")
    p.add_argument("--max_tokens", type=int, default=64)
    p.add_argument("--stream", action="store_true", help="use generate_stream (needs a decoupled tensorrt_llm)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template (server side)")
    p.add_argument("--model", default="ensemble", help="model to query")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top_k", type=int)
    p.add_argument("--top_p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--end_id", type=int)
    p.add_argument("--stop_words", nargs="+", help="stop strings")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the answer")


def run(args: argparse.Namespace) -> int:
    check_endpoint(args.url, args.timeout)
    params = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed,
              "end_id": args.end_id, "stop_words": args.stop_words}

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate(args.url, args.text, args.max_tokens, model=args.model, stream=args.stream, chat=args.chat,
             params=params, timeout=args.timeout, on_text=show)
    sys.stdout.write("\n")
    return 0
