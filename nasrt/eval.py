"""Quality checks on the reference runtime: perplexity of a text."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from tqdm import tqdm

from nasrt.errors import ConfigError
from nasrt.runtime.model import ReferenceModel

log = logging.getLogger(__name__)


def perplexity(model: ReferenceModel, tokenizer: Any, text: str, max_seq_len: int = 512,
               stride: int | None = None, progress: bool = True) -> float:
    """``exp(mean NLL)`` of ``text`` under ``model``.

    The text is tokenized once and scored in windows of ``max_seq_len`` tokens; each window starts ``stride``
    tokens after the previous one and scores only the tokens no earlier window scored, so no token is counted
    twice. With the default ``stride = max_seq_len`` (non-overlapping windows) the first token of every window
    has no context and is not scored; a smaller stride gives every token more context at more compute.
    """
    stride = stride or max_seq_len
    if max_seq_len < 2 or not 0 < stride <= max_seq_len:
        raise ConfigError(f"max_seq_len {max_seq_len} must be >= 2 and stride {stride} in [1, max_seq_len]")
    if max_seq_len > model.spec.max_position_embeddings:
        raise ConfigError(f"max_seq_len {max_seq_len} exceeds max_position_embeddings "
                          f"{model.spec.max_position_embeddings}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ConfigError("the text has fewer than two tokens; nothing to score")
    if max(ids) >= model.vocab_size:
        raise ConfigError(f"token id {max(ids)} is outside the model's vocab_size {model.vocab_size}")
    tokens = torch.tensor(ids, dtype=torch.long)
    nll, count, scored_to = 0.0, 0, 1  # tokens[:scored_to] need no (further) prediction
    starts = list(range(0, max(len(ids) - 1, 1), stride))
    for start in tqdm(starts, desc="perplexity", unit="window", disable=not progress):
        window = tokens[start:start + max_seq_len]
        if len(window) < 2 or start + len(window) <= scored_to:
            continue
        logits = model.logits(window[None])[0, :-1]  # (T-1, V), predicts window[1:]
        targets = window[1:]
        first = max(scored_to - start - 1, 0)  # first logit row whose target is not yet scored
        losses = torch.nn.functional.cross_entropy(logits[first:], targets[first:].to(logits.device),
                                                   reduction="sum")
        nll += float(losses)
        count += len(targets) - first
        scored_to = start + len(window)
    log.info("perplexity over %d predicted tokens", count)
    return math.exp(nll / count)
