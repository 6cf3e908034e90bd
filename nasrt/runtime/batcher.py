"""One batching engine over the reference runtime, shared by every server (``nasrt serve``, the Triton reference
model): a background thread owns the :class:`~nasrt.runtime.model.ReferenceModel` and runs continuous batching.

Requests (token ids + :class:`~nasrt.runtime.generate.SamplingConfig`) queue up; at every decode step the engine
admits waiting requests up to ``max_batch_size`` (their prompts are prefilled together, then their KV rows join the
running batch's cache), drops finished or cancelled rows, and decodes one token for every row at once. Each row
keeps its own stop conditions (end ids, stop words, text stop strings via :mod:`nasrt.runtime.stop`), its own
sampling settings and generator, and ``max_new_tokens`` bounded by the context (``max_position_embeddings`` or a
smaller ``max_seq_len``). Cancellation (:meth:`Handle.cancel`, or a polled ``is_cancelled`` callable) is checked
every step, so an abandoned request frees its row within one step.

KV layout: the batch shares one static :class:`~nasrt.runtime.layers.KVCache`; each row's valid slots are a
suffix of ``[0, cache.length)`` (left padding), so rows of different lengths coexist and a re-pack (join, leave,
growth) copies each row's suffix right-aligned into a new cache.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nasrt.errors import ConfigError, NasrtError
from nasrt.runtime.generate import SamplingConfig, _stop_state, end_ids, left_pad, sample
from nasrt.runtime.layers import KVCache
from nasrt.runtime.model import ReferenceModel
from nasrt.runtime.stop import TextStops

log = logging.getLogger(__name__)

#: KV slots added per re-pack when the batch cache is full (bounded by the longest remaining request).
GROW_SLOTS = 128
#: finish reasons (OpenAI's words; "cancelled" / "error" are ours).
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


class EngineClosedError(NasrtError):
    """The engine was shut down before the request finished."""


@dataclass
class GenerationRequest:
    """One prompt to complete. Callbacks run on the engine thread; an exception in one cancels the request."""

    prompt: list[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    #: called with each accepted token id as soon as it can no longer turn out to be part of a stop word / string
    on_token: Callable[[int], None] | None = None
    #: called once with the finished :class:`Handle` (any finish reason)
    on_done: Callable[[Handle], None] | None = None
    #: token ids -> text, needed for ``sampling.stop_strings``
    decode: Callable[[list[int]], str] | None = None
    #: polled every step (e.g. Triton's ``request.is_cancelled``); True cancels the request
    is_cancelled: Callable[[], bool] | None = None


class Handle:
    """A submitted request: wait for it, or cancel it."""

    def __init__(self, request: GenerationRequest, request_id: int, max_new_tokens: int) -> None:
        self.request = request
        self.id = request_id
        self.max_new_tokens = max_new_tokens  # after bounding by the context
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.prompt)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating for this request (takes effect at the next step)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        if self._cancel.is_set():
            return True
        poll = self.request.is_cancelled
        if poll is not None:
            try:
                if poll():
                    self._cancel.set()
            except Exception:  # noqa: BLE001 -- a dead transport counts as a client that is gone
                self._cancel.set()
        return self._cancel.is_set()

    def finished(self, timeout: float | None = None) -> bool:
        """Block until the request has finished (any reason); False after ``timeout``."""
        return self._done.wait(timeout)

    def wait(self, timeout: float | None = None) -> list[int]:
        """The generated tokens once finished (raises the request's error; TimeoutError after ``timeout``)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.tokens

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self.finish_reason, self.error = reason, error
        self.finished_at = time.monotonic()
        self._done.set()
        if self.request.on_done is not None:
            try:
                self.request.on_done(self)
            except Exception:  # noqa: BLE001 -- a callback must never stop the engine
                log.exception("on_done callback of request %d failed", self.id)


class _Row:
    """Generation state of one request in the running batch (mirrors :func:`nasrt.runtime.generate.generate`)."""

    def __init__(self, handle: Handle, model: ReferenceModel) -> None:
        self.handle = handle
        cfg = handle.request.sampling
        self.cfg = cfg
        self.ends = end_ids(model, cfg)
        self.stops = [list(s) for s in cfg.stop_words or []]
        self.text_stops = TextStops(cfg.stop_strings, handle.request.decode) if cfg.stop_strings else None
        self.gen: torch.Generator | None = None
        if not cfg.greedy:
            self.gen = torch.Generator(device=model.device)
            self.gen.manual_seed(cfg.seed) if cfg.seed is not None else self.gen.seed()
        self.out = handle.tokens
        self.steps = 0  # tokens sampled (EOS included)
        self.emitted = 0
        self.pending: int | None = None  # sampled, accepted, not yet in the KV cache

    def accept(self, tok: int) -> bool:
        """Take one sampled token; True when the request is finished (its reason set on the handle)."""
        self.steps += 1
        held, reason = 0, None
        if tok in self.ends:
            reason = STOP
        else:
            self.out.append(tok)
            matched, held = _stop_state(self.out, self.stops) if self.stops else (None, 0)
            if matched:
                del self.out[-matched:]
                reason = STOP
            elif self.text_stops is not None:
                keep, held = self.text_stops.update(self.out)
                if keep is not None:
                    del self.out[max(keep, self.emitted):]
                    reason = STOP
        if reason is None and self.steps >= self.handle.max_new_tokens:
            reason = LENGTH
        upto = len(self.out) if reason else len(self.out) - held
        on_token = self.handle.request.on_token
        if self.handle.first_token_at is None:
            self.handle.first_token_at = time.monotonic()
        for t in self.out[self.emitted:upto]:
            if on_token is not None:
                on_token(t)
        self.emitted = max(self.emitted, upto)
        self.pending = None if reason else tok
        if reason:
            log.info("request %d finished (%s) after %d tokens in %.2f s", self.handle.id, reason, len(self.out),
                     time.monotonic() - self.handle.submitted)
            self.handle._finish(reason)
        return reason is not None


def repack(model: ReferenceModel, sources: list[tuple[KVCache, int, int]], extra: int) -> KVCache:
    """A new cache holding, per output row, the last ``n`` valid slots of row ``r`` of ``cache`` for each
    ``(cache, r, n)`` in ``sources``, right-aligned, with ``extra`` free slots after them."""
    width = max(n for _, _, n in sources)
    new = model.new_cache(len(sources), width + extra)
    for dst, (src, r, n) in enumerate(sources):
        s = src.length
        for layer in new.k:
            new.k[layer][dst, :, width - n:width] = src.k[layer][r, :, s - n:s]
            new.v[layer][dst, :, width - n:width] = src.v[layer][r, :, s - n:s]
        new.valid[dst, width - n:width] = True
        new.next_pos[dst] = src.next_pos[r]
    new.length = width
    new.padded = any(n < width for _, _, n in sources)
    return new


class BatchingEngine:
    """Continuous batching over one :class:`ReferenceModel` on a background thread; use as a context manager
    (or :meth:`start` / :meth:`close`)."""

    def __init__(self, model: ReferenceModel, max_batch_size: int = 8, max_seq_len: int | None = None) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ConfigError(f"--max_batch_size {max_batch_size!r} must be an integer >= 1")
        limit = model.spec.max_position_embeddings
        if max_seq_len is not None:
            if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
                raise ConfigError(f"--max_seq_len {max_seq_len!r} must be an integer >= 2")
            limit = min(limit, max_seq_len)
        self.model = model
        self.max_batch_size = max_batch_size
        self.context = limit  #: prompt + generated tokens per request
        self._queue: queue.Queue[Handle] = queue.Queue()
        self._ids = itertools.count(1)
        self._rows: list[_Row] = []
        self._cache: KVCache | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0  #: decode steps run (for tests and logs)
        self.max_rows_seen = 0  #: the largest batch decoded so far

    # ---- client side ---------------------------------------------------------------------------------------
    def bounded_max_tokens(self, prompt_len: int, requested: int) -> int:
        """``requested`` new tokens bounded by what the context leaves after a ``prompt_len``-token prompt."""
        return max(0, min(requested, self.context - prompt_len))

    def check(self, request: GenerationRequest) -> int:
        """Validate ``request`` (ConfigError naming the problem); returns its bounded ``max_new_tokens``."""
        request.sampling.validate()
        if request.sampling.stop_strings and request.decode is None:
            raise ConfigError("stop strings need a tokenizer to decode the generated text")
        prompt = request.prompt
        if not prompt:
            raise ConfigError("the prompt encodes to no tokens")
        vocab = self.model.vocab_size
        if any(not 0 <= int(t) < vocab for t in prompt):
            raise ConfigError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt) >= self.context:
            raise ConfigError(f"the prompt has {len(prompt)} tokens; the model's context is {self.context} tokens "
                              "(prompt + output), so no token could be generated")
        return self.bounded_max_tokens(len(prompt), request.sampling.max_new_tokens)

    def submit(self, request: GenerationRequest) -> Handle:
        """Queue ``request`` (validated first, errors raised here); returns its :class:`Handle` at once."""
        if self._closed.is_set():
            raise EngineClosedError("the generation engine is shut down")
        max_new = self.check(request)
        handle = Handle(request, next(self._ids), max_new)
        if max_new == 0:
            handle._finish(LENGTH)
            return handle
        self._queue.put(handle)
        return handle

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> list[int]:
        """Submit and wait (convenience for callers without their own thread)."""
        return self.submit(request).wait(timeout)

    @property
    def active(self) -> int:
        """Requests generating or waiting."""
        return len(self._rows) + self._queue.qsize()

    # ---- life cycle ----------------------------------------------------------------------------------------
    def start(self) -> BatchingEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="nasrt-batcher", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; unfinished requests end with :class:`EngineClosedError`."""
        self._closed.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)  # the engine thread fails what is left when it exits
            if thread.is_alive():
                log.warning("the generation engine thread did not stop within %.0f s", timeout)
                return
        self._fail_all(EngineClosedError("the generation engine was shut down"))

    def __enter__(self) -> BatchingEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- engine thread -------------------------------------------------------------------------------------
    def _fail_all(self, error: BaseException) -> None:
        for row in self._rows:
            row.handle._finish(ERROR, error)
        self._rows, self._cache = [], None
        while True:
            try:
                self._queue.get_nowait()._finish(ERROR, error)
            except queue.Empty:
                return

    def _loop(self) -> None:
        while not self._closed.is_set():
            try:
                if not self._rows:
                    try:
                        first = self._queue.get(timeout=0.1)
                    except queue.Empty:
                        continue
                    self._admit([first])
                else:
                    self._admit([])
                if self._rows:
                    self._decode()
            except Exception as exc:  # noqa: BLE001 -- fail the batch, keep serving
                log.exception("generation step failed; failing %d request(s)", len(self._rows))
                for row in self._rows:
                    row.handle._finish(ERROR, exc)
                self._rows, self._cache = [], None
        self._fail_all(EngineClosedError("the generation engine was shut down"))

    def _drop(self) -> None:
        """Remove finished and cancelled rows (re-packing the cache when rows leave)."""
        keep = []
        for i, row in enumerate(self._rows):
            if not row.handle.done and row.handle.cancelled:
                self._cancelled(row, "its client cancelled it")
            if not row.handle.done:
                keep.append(i)
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache = [], None
            return
        cache = self._cache
        extra = cache.max_len - cache.length
        self._cache = repack(self.model, [(cache, i, self._valid(cache, i)) for i in keep], extra)
        self._rows = [self._rows[i] for i in keep]

    @staticmethod
    def _cancelled(row: _Row, why: str) -> None:
        log.info("request %d cancelled after %d tokens (%s)", row.handle.id, len(row.out), why)
        row.handle.cancel()
        row.handle._finish(CANCELLED)

    @staticmethod
    def _valid(cache: KVCache, row: int) -> int:
        return int(cache.valid[row, :cache.length].sum())

    def _headroom(self, rows: list[_Row]) -> int:
        left = max(r.handle.max_new_tokens - r.steps for r in rows)
        return max(1, min(GROW_SLOTS, left))

    def _admit(self, new: list[Handle]) -> None:
        """Prefill waiting requests (up to the free rows) and merge them into the running batch."""
        self._drop()
        while len(self._rows) + len(new) < self.max_batch_size:
            try:
                new.append(self._queue.get_nowait())
            except queue.Empty:
                break
        new = [h for h in new if not self._cancel_if(h)]
        if not new:
            return
        try:
            self._join(new)
        except Exception as exc:
            for h in new:  # not in the batch yet: the loop's handler would not see them
                h._finish(ERROR, exc)
            raise

    def _join(self, new: list[Handle]) -> None:
        rows = [_Row(h, self.model) for h in new]
        prompts = [h.request.prompt for h in new]
        started = time.monotonic()
        ids, mask = left_pad(prompts, 0)
        cache = self.model.new_cache(len(new), ids.shape[1])
        logits = self.model.prefill(ids, mask, cache)
        merged = [(self._cache, i, self._valid(self._cache, i)) for i in range(len(self._rows))] \
            if self._cache is not None else []
        for i, row in enumerate(rows):
            tok = int(sample(logits[i:i + 1], row.cfg, row.gen)[0])
            if not self._accept(row, tok):
                merged.append((cache, i, len(prompts[i])))
        log.info("admitted %d request(s) (prompts %s tokens) in %.2f s; batch now %d", len(new),
                 [len(p) for p in prompts], time.monotonic() - started, len(merged))
        live = [r for r in self._rows] + [r for r in rows if not r.handle.done]
        if not live:
            self._rows, self._cache = [], None
            return
        self._rows = live
        self._cache = repack(self.model, merged, self._headroom(live))

    def _cancel_if(self, handle: Handle) -> bool:
        if handle.cancelled:
            handle._finish(CANCELLED)
            return True
        return False

    def _accept(self, row: _Row, tok: int) -> bool:
        try:
            return row.accept(tok)
        except Exception as exc:  # noqa: BLE001 -- the consumer is gone (closed stream, dead sender)
            self._cancelled(row, f"its token callback failed: {exc}")
            return True

    def _decode(self) -> None:
        """One decode step for every row."""
        cache = self._cache
        if cache.length >= cache.max_len:
            self._cache = cache = repack(self.model, [(cache, i, self._valid(cache, i))
                                                      for i in range(len(self._rows))], self._headroom(self._rows))
        tokens = torch.tensor([r.pending for r in self._rows], dtype=torch.long)
        logits = self.model.decode_one_token(tokens, cache)
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        greedy = [i for i, r in enumerate(self._rows) if r.cfg.greedy]
        picks = dict(zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True)) if greedy else {}
        for i, row in enumerate(self._rows):
            tok = picks[i] if i in picks else int(sample(logits[i:i + 1], row.cfg, row.gen)[0])
            self._accept(row, tok)
        self._drop()

