"""``nasrt run`` / ``run.py``: generate text from a checkpoint (reference runtime) or an engine (TensorRT-LLM),
with TensorRT-LLM ``examples/run.py`` flags."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nasrt.errors import ConfigError

HELP = "generate text from a nasrt checkpoint (PyTorch reference runtime) or a TensorRT-LLM engine"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("model (exactly one)")
    src.add_argument("--checkpoint_dir", help="TensorRT-LLM checkpoint written by nasrt: run it with PyTorch")
    src.add_argument("--model_dir", help="HF DeciLM / Llama dir or ModelOpt unified FP8 checkpoint (what TensorRT-LLM's "
                     "PyTorch backend loads): run it with the reference runtime")
    src.add_argument("--engine_dir", help="TensorRT-LLM engine directory: run it with the TensorRT-LLM runtime")
    p.add_argument("--tokenizer_dir", help="HF tokenizer directory (default: the checkpoint dir if it has one)")
    p.add_argument("--input_text", nargs="+", help="one or more prompts")
    p.add_argument("--input_file", help="a text file with one prompt per line")
    p.add_argument("--max_output_len", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=1, help="1 = greedy, 0 = no top-k limit")
    p.add_argument("--top_p", type=float, default=0.0, help="0 = no nucleus filter")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--end_id", type=int, default=None, help="default: the model's eos_token_id")
    p.add_argument("--pad_id", type=int, default=None)
    p.add_argument("--stop_words", nargs="+", default=None, help="strings that end generation (not printed)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt with the tokenizer's chat template")
    p.add_argument("--allow_external_files", action="store_true",
                   help="read rank files whose symlinks resolve outside --checkpoint_dir (refused by default)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the reference runtime (default: the checkpoint's)")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=True,
                   help="print tokens as they come (batch of one prompt)")
    eng = p.add_argument_group("engine runtime only")
    eng.add_argument("--use_py_session", action="store_true")
    eng.add_argument("--launch", action="store_true")
    eng.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=0.9)
    eng.add_argument("--max_input_length", type=int, default=923)
    eng.add_argument("--num_beams", type=int, default=1)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """Prompts from ``--input_text`` and/or ``--input_file`` (one per non-empty line)."""
    prompts = list(args.input_text or [])
    if args.input_file:
        path = Path(args.input_file)
        if not path.is_file():
            raise ConfigError(f"--input_file {path}: file not found")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--input_file {path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        if args.input_file:
            raise ConfigError(f"--input_file {args.input_file} holds no prompt (it is empty or has only blank lines)")
        raise ConfigError("give --input_text and/or --input_file")
    return prompts


def sampling_flags(args: argparse.Namespace):
    """The sampling flags as a validated ``SamplingConfig`` (stop words as text): refused by flag name before
    any tokenizer or model is loaded."""
    from nasrt.runtime import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=args.max_output_len, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed, end_id=args.end_id, pad_id=args.pad_id,
                         stop_strings=list(args.stop_words) if args.stop_words else None)
    cfg.validate()
    return cfg


def _which(given: list[str]) -> str:
    return "neither" if not given else f"both ({' and '.join(given)})" if len(given) == 2 else ", ".join(given)


def run(args: argparse.Namespace) -> int:
    sampling_flags(args)
    given = [f for f in ("--checkpoint_dir", "--model_dir", "--engine_dir") if getattr(args, f[2:])]
    if len(given) != 1:
        raise ConfigError("give exactly one of --checkpoint_dir / --model_dir (reference runtime) and --engine_dir "
                          f"(TensorRT-LLM runtime); got {_which(given)}")
    if args.engine_dir:
        try:
            from nasrt.deploy.engine.runner import run_engine
        except ImportError as exc:
            from nasrt.errors import MissingDependencyError

            raise MissingDependencyError(f"--engine_dir needs the TensorRT-LLM runtime path ({exc})") from None
        return run_engine(args)
    return run_checkpoint(args)


def run_checkpoint(args: argparse.Namespace) -> int:
    from nasrt.runtime import generate, load_model
    from nasrt.runtime.text import (
        check_prompts,
        check_vocab,
        decode,
        encode_prompts,
        has_tokenizer,
        load_tokenizer,
    )

    if args.num_beams != 1:
        raise ConfigError(f"--num_beams {args.num_beams}: the reference runtime does greedy/sampling only (1)")
    cfg = sampling_flags(args)
    prompts = read_prompts(args)
    src_flag, src_dir = ("--model_dir", args.model_dir) if args.model_dir else ("--checkpoint_dir", args.checkpoint_dir)
    tok_dir = args.tokenizer_dir or src_dir
    if not args.tokenizer_dir and not has_tokenizer(tok_dir):
        raise ConfigError(f"{src_flag} {tok_dir} has no tokenizer files; pass --tokenizer_dir <HF model dir>")
    tokenizer = load_tokenizer(tok_dir)
    model = load_model(src_dir, device=args.device, dtype=args.dtype,
                       allow_external=args.allow_external_files)
    check_vocab(tokenizer, model.spec)
    batch = encode_prompts(tokenizer, prompts, chat=args.chat)
    check_prompts(batch, model.spec)
    stream = args.streaming and len(prompts) == 1
    on_token = None
    if stream:
        shown: list[int] = []
        printed = ""
        print(f'Input: "{prompts[0]}"\nOutput: "', end="", flush=True)

        def on_token(_index: int, token: int) -> None:
            nonlocal printed
            shown.append(token)
            text = decode(tokenizer, shown)
            if text.startswith(printed) and not text.endswith("\ufffd"):  # only text that is final
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text

    outputs = generate(model, batch, cfg, on_token=on_token, decode=lambda ids: decode(tokenizer, ids))
    if stream:
        text = decode(tokenizer, outputs[0])
        print(f'{text[len(printed):] if text.startswith(printed) else ""}"', flush=True)
        return 0
    for prompt, out in zip(prompts, outputs, strict=True):
        print(f'Input: "{prompt}"')
        print(f'Output: "{decode(tokenizer, out)}"')
    return 0
