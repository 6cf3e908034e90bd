"""Text side of the OpenAI server: prompts through the tokenizer (chat template for chat requests) and
incremental detokenization for streaming, whose pieces always add up to the non-streamed text."""

from __future__ import annotations

import logging
from typing import Any

from nasrt.deploy.serve.protocol import ApiError, Message
from nasrt.runtime.text import decode

log = logging.getLogger(__name__)


def chat_prompt(tokenizer: Any, messages: list[Message]) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template (generation prompt added)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "the model's tokenizer has no chat template; use /v1/completions", "messages")
    rendered = tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                             tokenize=False, add_generation_prompt=True)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def completion_prompts(tokenizer: Any, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """One token-id list per prompt of a ``/v1/completions`` request (text, texts, ids or lists of ids)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    if not prompt:
        raise ApiError(400, "prompt is empty", "prompt")
    return [list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[arg-type]


class IncrementalText:
    """Turns generated token ids into text pieces: a piece is released once it cannot change (no trailing
    partial UTF-8 character); :meth:`finish` releases the rest so the pieces join to ``decode(all tokens)``."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.sent = ""
        self._prefix = 0  # window start: a few tokens of context keep word-boundary spaces right
        self._read = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        before = decode(self.tokenizer, self.tokens[self._prefix:self._read])
        after = decode(self.tokenizer, self.tokens[self._prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        piece = after[len(before):]
        self._prefix, self._read = self._read, len(self.tokens)
        self.sent += piece
        return piece

    def finish(self, tokens: list[int] | None = None) -> str:
        """The remaining text of ``tokens`` (default: the pushed ones) after what was already sent."""
        full = decode(self.tokenizer, self.tokens if tokens is None else tokens)
        if not full.startswith(self.sent):
            log.warning("streamed text %r is not a prefix of the decoded text %r", self.sent, full)
            return ""
        rest, self.sent = full[len(self.sent):], full
        return rest
