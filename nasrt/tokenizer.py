"""The one tokenizer loader of nasrt: a tokenizer from its own files, offline, never running remote code.

A real Nemotron-NAS model directory has ``model_type: nemotron-nas`` and an ``auto_map`` to remote code in its
``config.json``; transformers' ``AutoTokenizer`` reads that config and fails (or asks to run the remote code).
The tokenizer itself needs none of it: ``tokenizer.json`` (the fast tokenizer) plus ``tokenizer_config.json``
(special tokens, chat template, limits) describe it completely. So the tokenizer is built from exactly those files
with ``PreTrainedTokenizerFast(tokenizer_file=...)``; ``config.json`` is never read. Only a directory without a
``tokenizer.json`` (a SentencePiece ``tokenizer.model``) falls back to ``AutoTokenizer`` with
``local_files_only=True, trust_remote_code=False``.

This module imports nothing from nasrt at module level beyond an optional error base, because the Triton
pre/post-processing models load it from a copy beside their ``model.py`` on servers without nasrt.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

try:
    from nasrt.errors import ConfigError as _Base
except ImportError:  # a copy beside a Triton model.py, on a server without nasrt
    _Base = ValueError  # type: ignore[assignment,misc]


class TokenizerError(_Base):  # type: ignore[valid-type,misc]
    """The tokenizer files of a directory cannot be read (a ``ConfigError`` inside nasrt)."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
#: ``tokenizer_config.json`` keys passed on to the tokenizer (everything else there is ignored, ``auto_map`` too).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
PASSED_KEYS = ("model_max_length", "clean_up_tokenization_spaces", "padding_side", "truncation_side")
MAX_FILE_BYTES = 256 << 20


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not _regular(path):
        raise TokenizerError(f"{what} {path}: not a regular file")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise TokenizerError(f"{what} {path}: too large ({path.stat().st_size} bytes)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise TokenizerError(f"{what} {path}: not a UTF-8 JSON file ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{what} {path}: must hold a JSON object")
    return data


def _token(value: Any) -> str | None:
    """A special token as written in ``tokenizer_config.json``: a string or an ``AddedToken`` dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_template(path: Path, config: dict[str, Any]) -> str | None:
    """The chat template: ``tokenizer_config.json`` (a string, or the ``default`` of a named list), else
    ``chat_template.jinja``, else ``chat_template.json``."""
    value = config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    if isinstance(value, str) and value:
        return value
    jinja = path / "chat_template.jinja"
    if _regular(jinja):
        return jinja.read_text(encoding="utf-8")
    as_json = path / "chat_template.json"
    if _regular(as_json):
        value = _read_json(as_json, "chat template").get("chat_template")
        return value if isinstance(value, str) else None
    return None


def tokenizer_kwargs(path: Path) -> dict[str, Any]:
    """Constructor arguments from ``tokenizer_config.json`` / ``special_tokens_map.json`` (both optional)."""
    config = _read_json(path / "tokenizer_config.json", "tokenizer config") \
        if (path / "tokenizer_config.json").exists() else {}
    special = _read_json(path / "special_tokens_map.json", "special tokens map") \
        if (path / "special_tokens_map.json").exists() else {}
    kwargs: dict[str, Any] = {}
    for key in SPECIAL_TOKEN_KEYS:
        token = _token(config.get(key)) or _token(special.get(key))
        if token is not None:
            kwargs[key] = token
    for key in PASSED_KEYS:
        value = config.get(key)
        if value is not None and not isinstance(value, (dict, list)):
            kwargs[key] = value
    template = chat_template(path, config)
    if template is not None:
        kwargs["chat_template"] = template
    return kwargs


def load_tokenizer_files(tokenizer_dir: str | Path, flag: str = "--tokenizer_dir") -> Any:
    """The HF tokenizer of ``tokenizer_dir`` from its own files (see the module docstring)."""
    path = Path(tokenizer_dir)
    if not path.is_dir():
        raise TokenizerError(f"{flag} {path}: directory not found")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise TokenizerError(f"{flag} {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}), so no tokenizer "
                             f"found; point {flag} at the HF model directory")
    tokenizer_json = path / "tokenizer.json"
    if tokenizer_json.exists():
        if not _regular(tokenizer_json):
            raise TokenizerError(f"{flag} {tokenizer_json}: not a regular file")
        kwargs = tokenizer_kwargs(path)
        from transformers import PreTrainedTokenizerFast

        try:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), **kwargs)
        except Exception as exc:  # tokenizers raises its own Exception type for malformed files
            raise TokenizerError(f"{flag} {path}: cannot load tokenizer.json ({exc})") from None
        tok.name_or_path = str(path)
        return tok
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for unreadable tokenizers
        raise TokenizerError(f"{flag} {path}: cannot load the tokenizer without a tokenizer.json ({exc})") from None
