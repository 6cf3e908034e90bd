"""Tokenizer side of the reference runtime: loading, prompt encoding (optionally through the chat template),
decoding, and the checks that tie a tokenizer and prompts to a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nasrt.arch import ModelSpec
from nasrt.errors import ConfigError
from nasrt.tokenizer import TOKENIZER_FILES, load_tokenizer_files


def has_tokenizer(path: str | Path) -> bool:
    return any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def load_tokenizer(tokenizer_dir: str | Path, flag: str = "--tokenizer_dir") -> Any:
    """An HF tokenizer from ``tokenizer_dir``'s own files, offline, never running remote code
    (:func:`nasrt.tokenizer.load_tokenizer_files`, the one loader every stage uses)."""
    return load_tokenizer_files(tokenizer_dir, flag)


def check_vocab(tokenizer: Any, spec: ModelSpec) -> None:
    """The tokenizer must not produce ids the embedding does not have."""
    if len(tokenizer) > spec.vocab_size:
        raise ConfigError(f"tokenizer vocabulary ({len(tokenizer)} tokens) is larger than the model's embedding "
                          f"(vocab_size {spec.vocab_size}): wrong --tokenizer_dir?")


def encode_prompts(tokenizer: Any, texts: list[str], chat: bool = False) -> list[list[int]]:
    """Token ids of each prompt; ``chat`` wraps each as one user message with the tokenizer's chat template."""
    if chat and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--chat: the tokenizer has no chat template")
    out = []
    for text in texts:
        if chat:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                     add_generation_prompt=True)
            out.append(list(tokenizer(rendered, add_special_tokens=False)["input_ids"]))
        else:
            out.append(list(tokenizer(text)["input_ids"]))
    return out


def check_prompts(prompts: list[list[int]], spec: ModelSpec) -> None:
    """Every prompt is non-empty and fits ``max_position_embeddings``."""
    for i, ids in enumerate(prompts):
        if not ids:
            raise ConfigError(f"prompt {i} encodes to no tokens")
        if len(ids) > spec.max_position_embeddings:
            raise ConfigError(f"prompt {i} has {len(ids)} tokens, more than max_position_embeddings "
                              f"{spec.max_position_embeddings}")


def decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)
