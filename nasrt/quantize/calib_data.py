"""Calibration text: a local text / JSONL / parquet file, a Hugging Face dataset name, or (default) CPython's
bundled documentation; tokenized into batches of token ids."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from nasrt.errors import ConfigError, MissingDependencyError
from nasrt.textdata import calibration_texts

log = logging.getLogger(__name__)

DEFAULT_DATASET = "pydoc"  # CPython's pydoc_data.topics, the calibration slice (disjoint from eval_text)
_TEXT_FIELDS = ("text", "article", "content")


def _read_text_file(path: Path) -> list[str]:
    """Plain text: paragraphs separated by blank lines (one sample each)."""
    text = path.read_text(encoding="utf-8", errors="replace")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _read_jsonl(path: Path) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--calib_dataset {path}: line {lineno} is not JSON ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise ConfigError(f"--calib_dataset {path}: line {lineno} has no string field 'text'")
            if row["text"].strip():
                out.append(row["text"])
    return out


def _read_parquet(path: Path) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # e.g. a pyarrow built for NumPy 2 next to NumPy 1
        raise MissingDependencyError(f"--calib_dataset {path}: reading parquet needs a working pyarrow ({exc})") \
            from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError
        raise ConfigError(f"--calib_dataset {path}: not a readable parquet file ({exc})") from None
    field = next((f for f in _TEXT_FIELDS if f in table.column_names), None)
    if field is None:
        raise ConfigError(f"--calib_dataset {path}: no column named one of {list(_TEXT_FIELDS)} "
                          f"(columns: {table.column_names})")
    return [t for t in table.column(field).to_pylist() if isinstance(t, str) and t.strip()]


def _read_hf_dataset(name: str, n: int) -> list[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise MissingDependencyError(f"--calib_dataset {name!r} is neither a local file nor usable as a Hugging Face "
                                     "dataset name: the 'datasets' package is not installed (and this needs a "
                                     "network). Pass a local .txt / .jsonl / .parquet file instead.") from None
    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
    except Exception as exc:
        raise ConfigError(f"--calib_dataset {name!r}: cannot load the Hugging Face dataset ({exc})") from None
    out: list[str] = []
    for row in ds:
        field = next((f for f in _TEXT_FIELDS if isinstance(row.get(f), str)), None)
        if field is None:
            raise ConfigError(f"--calib_dataset {name!r}: rows have no text field {list(_TEXT_FIELDS)}")
        out.append(row[field])
        if len(out) >= n:
            break
    return out


def load_calibration_texts(source: str | None, n: int) -> list[str]:
    """Up to ``n`` calibration texts from ``source``; fewer than ``n`` is a warning, none is an error."""
    if n < 1:
        raise ConfigError(f"--calib_size {n} must be >= 1")
    if source in (None, "", DEFAULT_DATASET):
        texts, where = calibration_texts(n), "pydoc_data.topics (calibration slice)"
    else:
        path = Path(source)
        looks_like_file = path.suffix.lower() in (".txt", ".text", ".md", ".jsonl", ".json", ".parquet") \
            or source.startswith((".", "/", "~"))
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix in (".jsonl", ".json"):
                texts = _read_jsonl(path)
            elif suffix == ".parquet":
                texts = _read_parquet(path)
            else:
                texts = _read_text_file(path)
        elif path.is_dir() or looks_like_file:
            raise ConfigError(f"--calib_dataset {source}: file not found (expected a .txt, .jsonl or .parquet file)")
        else:
            texts = _read_hf_dataset(source, n)
        where = source
    if not texts:
        raise ConfigError(f"--calib_dataset {where}: no calibration text found (the file is empty)")
    if len(texts) < n:
        log.warning("--calib_dataset %s has only %d samples, fewer than --calib_size %d: calibrating with %d",
                    where, len(texts), n, len(texts))
    return texts[:n]


def tokenize_batches(tokenizer, texts: list[str], max_seq_length: int, batch_size: int,
                     pad_token_id: int | None = None) -> list[torch.Tensor]:
    """Token-id batches ``[b, s]``. Shorter samples in a batch are right-padded: with causal attention the
    real tokens never see the padding, so no attention mask is needed."""
    if max_seq_length < 1 or batch_size < 1:
        raise ConfigError(f"--calib_max_seq_length {max_seq_length} and --batch_size {batch_size} must be >= 1")
    ids = [tokenizer(t, truncation=True, max_length=max_seq_length)["input_ids"] for t in texts]
    ids = [x for x in ids if x]
    if not ids:
        raise ConfigError("calibration texts tokenize to nothing")
    pad = pad_token_id if pad_token_id is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id
                                                         is not None else tokenizer.eos_token_id or 0)
    batches = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        width = max(len(x) for x in chunk)
        batches.append(torch.tensor([x + [pad] * (width - len(x)) for x in chunk], dtype=torch.long))
    return batches


def load_tokenizer(tokenizer_dir: str | Path):
    """The calibration tokenizer: :func:`nasrt.tokenizer.load_tokenizer_files` (offline, no remote code)."""
    from nasrt.tokenizer import load_tokenizer_files

    return load_tokenizer_files(tokenizer_dir)
