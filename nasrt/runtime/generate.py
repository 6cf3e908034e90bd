"""Batched generation on the reference runtime: left padding, static KV cache, greedy or sampled decoding,
EOS and stop words, tokens streamed through a callback as they are accepted."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nasrt.errors import ConfigError
from nasrt.runtime.model import ReferenceModel
from nasrt.runtime.stop import TextStops, check_stop_strings


def _integer(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclass
class SamplingConfig:
    """TensorRT-LLM run.py semantics: ``top_k == 1`` is greedy, ``top_k == 0`` no top-k limit,
    ``top_p == 0`` no nucleus filter. ``end_id`` None = the model's ``eos_token_id`` (one id or a list)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0
    seed: int | None = None
    end_id: int | list[int] | None = None
    pad_id: int | None = None
    stop_words: list[list[int]] | None = None  # token sequences; generation stops after one, which is dropped
    #: strings matched on the decoded text (needs ``generate(..., decode=...)``); the stop string is dropped
    stop_strings: list[str] | None = None

    def validate(self) -> None:
        """Refuse bad values by flag name (cheap: call it before loading a model)."""
        if not _integer(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ConfigError(f"--max_output_len {self.max_new_tokens!r} must be an integer >= 0")
        if not _integer(self.top_k) or self.top_k < 0:
            raise ConfigError(f"--top_k {self.top_k!r} must be an integer >= 0")
        if not (_real(self.top_p) and 0.0 <= self.top_p <= 1.0):
            raise ConfigError(f"--top_p {self.top_p!r} must be in [0, 1]")
        if not (_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature {self.temperature!r} must be a finite number >= 0")
        for flag, value in (("--end_id", self.end_id), ("--pad_id", self.pad_id), ("--seed", self.seed)):
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(v is not None and not _integer(v) for v in values):
                raise ConfigError(f"{flag} {value!r} must be an integer")
        if any(not s for s in self.stop_words or []):
            raise ConfigError("--stop_words: a stop word encodes to no tokens")
        check_stop_strings(self.stop_strings)

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0.0


def end_ids(model: ReferenceModel, cfg: SamplingConfig) -> set[int]:
    ids = cfg.end_id if cfg.end_id is not None else model.spec.eos_token_id
    if ids is None:
        return set()
    return {int(i) for i in ids} if isinstance(ids, (list, tuple)) else {int(ids)}


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ``(B,)`` from float32 logits ``(B, V)``."""
    if cfg.greedy:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k > 1:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p (at least one)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _stop_state(tokens: list[int], stop_words: list[list[int]]) -> tuple[int | None, int]:
    """(length of a stop word ending ``tokens`` or None, length of the longest proper stop-word prefix at the end)."""
    held = 0
    for word in stop_words:
        n = len(word)
        if len(tokens) >= n and tokens[-n:] == word:
            return n, 0
        for k in range(min(n - 1, len(tokens)), held, -1):
            if tokens[-k:] == word[:k]:
                held = k
                break
    return None, held


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``(B, T)`` with every prompt right-aligned."""
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, t - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, t - len(p):] = True
    return ids, mask


def generate(model: ReferenceModel, batch_input_ids: list[list[int]], cfg: SamplingConfig,
             on_token: Callable[[int, int], None] | None = None,
             decode: Callable[[list[int]], str] | None = None) -> list[list[int]]:
    """Generate for a batch of prompts; returns only the new tokens of each (EOS and stop words excluded).

    ``on_token(batch_index, token_id)`` is called for each accepted token as soon as it can no longer turn out
    to be part of a stop word. ``decode`` (token ids -> text) is needed for ``cfg.stop_strings``.
    """
    cfg.validate()
    if cfg.stop_strings and decode is None:
        raise ValueError("SamplingConfig.stop_strings needs generate(..., decode=...)")
    if not batch_input_ids or any(not p for p in batch_input_ids):
        raise ConfigError("every prompt must contain at least one token")
    longest = max(len(p) for p in batch_input_ids)
    limit = model.spec.max_position_embeddings
    if longest > limit:
        raise ConfigError(f"a prompt of {longest} tokens is longer than max_position_embeddings {limit}")
    max_new = min(cfg.max_new_tokens, limit - longest)
    ends = end_ids(model, cfg)
    stops = [list(s) for s in cfg.stop_words or []]
    vocab = model.vocab_size
    pad = cfg.pad_id if cfg.pad_id is not None else min((e for e in ends if 0 <= e < vocab), default=0)
    if not 0 <= pad < vocab:
        raise ConfigError(f"--pad_id {pad} is outside the vocabulary [0, {vocab})")
    b = len(batch_input_ids)
    out: list[list[int]] = [[] for _ in range(b)]
    if max_new == 0:
        return out
    gen = None
    if not cfg.greedy:
        gen = torch.Generator(device=model.device)
        gen.manual_seed(cfg.seed) if cfg.seed is not None else gen.seed()

    ids, mask = left_pad(batch_input_ids, pad)
    cache = model.new_cache(b, ids.shape[1] + max_new)
    logits = model.prefill(ids, mask, cache)
    done = [False] * b
    emitted = [0] * b
    text_stops = [TextStops(cfg.stop_strings, decode) for _ in range(b)] if cfg.stop_strings else None
    for step in range(max_new):
        tokens = sample(logits, cfg, gen)
        for i, tok in enumerate(tokens.tolist()):
            if done[i]:
                continue
            held = 0
            if tok in ends:
                done[i] = True
            else:
                out[i].append(tok)
                matched, held = _stop_state(out[i], stops) if stops else (None, 0)
                if matched:
                    del out[i][-matched:]
                    done[i] = True
                elif text_stops is not None:
                    keep, held = text_stops[i].update(out[i])
                    if keep is not None:
                        del out[i][max(keep, emitted[i]):]
                        done[i] = True
            last = step == max_new - 1
            upto = len(out[i]) if done[i] or last else len(out[i]) - held
            if on_token is not None:
                for t in out[i][emitted[i]:upto]:
                    on_token(i, t)
            emitted[i] = max(emitted[i], upto)
        if all(done) or step == max_new - 1:
            break
        logits = model.decode_one_token(tokens, cache)
    return out
