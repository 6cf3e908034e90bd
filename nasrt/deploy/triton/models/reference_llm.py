"""Triton ``tensorrt_llm`` stand-in for CPU machines: same inputs and outputs, answered by nasrt's reference runtime.

Used by ``nasrt triton --reference``: ``tensorrt_llm/1/model.py`` imports this module. Parameters:
``checkpoint_dir`` (a nasrt / TensorRT-LLM checkpoint dir), ``exclude_input_in_output`` (default for requests
that do not send it), ``max_seq_len``. Streaming needs ``decoupled: true``; each streamed response carries the
new token only, as the C++ backend does. Features the reference runtime lacks (beam search, penalties,
``min_tokens``, bad words) are refused with an error instead of being ignored. Requests run on one shared
batching engine (:mod:`nasrt.runtime.batcher`): concurrent requests decode together, ``request_output_len`` is
bounded by the context, and a request Triton reports cancelled (``is_cancelled``) or whose response sender fails
is dropped at the next step.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nasrt.deploy.triton.models import batched
from nasrt.deploy.triton.models.batched import pb_utils  # Triton's Python-backend utils there, else None

if TYPE_CHECKING:
    from nasrt.runtime.batcher import Handle

log = logging.getLogger(__name__)

#: optional inputs with the value that means "feature off"; anything else is refused.
NEUTRAL = {"len_penalty": 1.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
           "min_tokens": 0, "beam_width": 1}


@dataclass
class LlmRequest:
    """One Triton request, decoded from the ``tensorrt_llm`` input tensors."""

    prompts: list[list[int]]
    max_new_tokens: int
    end_id: int | None = None
    pad_id: int | None = None
    streaming: bool = False
    exclude_input: bool = True
    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 0.0
    seed: int | None = None
    stop_words: list[list[int]] = field(default_factory=list)


def from_word_list(array: np.ndarray) -> list[list[int]]:
    """``[2, n]`` (ids, end offsets padded with -1) -> list of words (each a list of ids)."""
    ids, offsets = np.asarray(array).reshape(2, -1)
    words, start = [], 0
    for end in offsets:
        if end < 0:
            break
        words.append([int(t) for t in ids[start:int(end)]])
        start = int(end)
    return [w for w in words if w]


def _scalar(get: Callable[[str], np.ndarray | None], name: str, batch: int):
    """One value per request (every batch row must agree); ``None`` when the input is absent."""
    array = get(name)
    if array is None:
        return None
    values = np.asarray(array).reshape(batch, -1)[:, 0]
    if len(set(values.tolist())) > 1:
        raise ValueError(f"input {name!r}: rows of one request differ ({values.tolist()}); send separate requests")
    return values[0].item()


def parse_request(get: Callable[[str], np.ndarray | None], exclude_default: bool = True) -> LlmRequest:
    """Decode one request; ``get(name)`` returns the input as numpy or ``None`` when it was not sent."""
    ids = get("input_ids")
    if ids is None:
        raise ValueError("input_ids is required for decoder-only models")
    ids = np.asarray(ids).reshape(np.asarray(ids).shape[0], -1)
    batch = ids.shape[0]
    lengths = np.asarray(get("input_lengths")).reshape(batch, -1)[:, 0]
    out_len = _scalar(get, "request_output_len", batch)
    if out_len is None or out_len <= 0:
        raise ValueError(f"request_output_len must be a positive number, got {out_len}")
    for name, neutral in NEUTRAL.items():
        value = _scalar(get, name, batch)
        if value is not None and value != neutral:
            raise ValueError(f"{name}={value} is not supported by the nasrt reference runtime (only {neutral})")
    bad = get("bad_words_list")
    if bad is not None and any(from_word_list(row) for row in np.asarray(bad).reshape(batch, 2, -1)):
        raise ValueError("bad_words is not supported by the nasrt reference runtime")
    stop = get("stop_words_list")
    stop_rows = [from_word_list(row) for row in np.asarray(stop).reshape(batch, 2, -1)] if stop is not None else []
    if stop_rows and any(r != stop_rows[0] for r in stop_rows):
        raise ValueError("stop_words differ between rows of one request; send separate requests")
    top_k, top_p = _scalar(get, "runtime_top_k", batch), _scalar(get, "runtime_top_p", batch)
    top_p = float(top_p or 0.0)
    # TensorRT-LLM: top_k 0 with top_p 0 is greedy; top_k 0 with top_p > 0 is pure nucleus sampling.
    top_k = int(top_k) if top_k else (0 if top_p > 0 else 1)
    temperature = _scalar(get, "temperature", batch)
    exclude = _scalar(get, "exclude_input_in_output", batch)
    end_id, pad_id, seed = (_scalar(get, n, batch) for n in ("end_id", "pad_id", "seed"))
    return LlmRequest(
        prompts=[[int(t) for t in row[:int(n)]] for row, n in zip(ids, lengths, strict=True)],
        max_new_tokens=int(out_len),
        end_id=None if end_id is None else int(end_id),
        pad_id=None if pad_id is None else int(pad_id),
        streaming=bool(_scalar(get, "streaming", batch) or False),
        exclude_input=exclude_default if exclude is None else bool(exclude),
        temperature=1.0 if temperature is None else float(temperature),
        top_k=top_k, top_p=top_p,
        seed=None if seed is None else int(seed),
        stop_words=stop_rows[0] if stop_rows else [],
    )


def output_arrays(req: LlmRequest, generated: list[list[int]]) -> dict[str, np.ndarray]:
    """``output_ids [batch, 1, tokens]`` and ``sequence_length [batch, 1]`` for a finished request."""
    rows = [g if req.exclude_input else p + g for p, g in zip(req.prompts, generated, strict=True)]
    pad = req.pad_id if req.pad_id is not None else (req.end_id if req.end_id is not None else 0)
    width = max([1] + [len(r) for r in rows])
    ids = np.full((len(rows), 1, width), pad, dtype=np.int32)
    for i, row in enumerate(rows):
        ids[i, 0, :len(row)] = row
    return {"output_ids": ids, "sequence_length": np.array([[len(r)] for r in rows], dtype=np.int32)}


class ReferenceLlm:
    """Runs :class:`LlmRequest` s on nasrt's reference runtime through one shared
    :class:`~nasrt.runtime.batcher.BatchingEngine` (continuous batching: concurrent requests decode together;
    ``request_output_len`` is bounded by the context; a cancelled request frees its row at the next step)."""

    def __init__(self, checkpoint_dir: str, device: str = "cpu", max_seq_len: int | None = None,
                 max_batch_size: int = 8) -> None:
        from nasrt.runtime import load_model
        from nasrt.runtime.batcher import BatchingEngine

        self.model = load_model(checkpoint_dir, device=device)
        self.engine = BatchingEngine(self.model, max_batch_size=max_batch_size, max_seq_len=max_seq_len).start()

    def submit(self, req: LlmRequest, on_token: Callable[[int, int], None] | None = None,
               on_done: Callable[[list[Handle]], None] | None = None,
               is_cancelled: Callable[[], bool] | None = None) -> list[Handle]:
        """Queue every row of ``req`` (validated first: errors are raised here, before anything runs).

        ``on_token(row, token)`` streams; ``on_done(handles)`` runs once, when every row has finished."""
        from nasrt.runtime import SamplingConfig
        from nasrt.runtime.batcher import GenerationRequest

        sampling = SamplingConfig(max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                                  top_p=req.top_p, seed=req.seed, end_id=req.end_id, pad_id=req.pad_id,
                                  stop_words=req.stop_words or None)
        for prompt in req.prompts:
            bounded = self.engine.check(GenerationRequest(prompt, sampling))
            if bounded < req.max_new_tokens:
                log.info("request_output_len %d bounded to %d by the context of %d tokens", req.max_new_tokens,
                         bounded, self.engine.context)
        handles: list[Handle] = []
        remaining = [len(req.prompts) + 1]  # every row, plus the end of submission (so no lock is held there)
        lock = threading.Lock()

        def done(_handle: Handle | None) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last and on_done is not None:
                on_done(handles)

        def row_callback(row: int) -> Callable[[int], None] | None:
            return None if on_token is None else (lambda tok: on_token(row, tok))

        try:
            for i, prompt in enumerate(req.prompts):
                handles.append(self.engine.submit(GenerationRequest(prompt, sampling, on_token=row_callback(i),
                                                                    on_done=done, is_cancelled=is_cancelled)))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        done(None)
        return handles

    def generate(self, req: LlmRequest, on_token: Callable[[int, int], None] | None = None) -> list[list[int]]:
        """Blocking: the new tokens of every row."""
        return [h.wait() for h in self.submit(req, on_token)]

    def close(self, timeout: float = 2.0) -> None:
        self.engine.close(timeout)


class TritonPythonModel:
    """Triton entry points. ``execute`` only queues the requests on the batching engine and returns (decoupled or
    not, :func:`~nasrt.deploy.triton.models.batched.execute`); responses are sent from the engine thread as tokens
    come, so requests arriving meanwhile join the running batch."""

    def initialize(self, args: dict) -> None:
        batched.forward_logs()
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        if not params.get("checkpoint_dir"):
            raise ValueError("tensorrt_llm (reference): parameter checkpoint_dir is not set in config.pbtxt")
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.exclude_default = params.get("exclude_input_in_output", "true").lower() == "true"
        max_seq = params.get("max_seq_len", "")
        batch = int(config.get("max_batch_size") or 0) or 8
        self.llm = ReferenceLlm(params["checkpoint_dir"], device=params.get("device") or "cpu",
                                max_seq_len=int(max_seq) if max_seq.isdigit() else None, max_batch_size=batch)

    @staticmethod
    def _response(arrays: dict[str, np.ndarray]):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()])

    @staticmethod
    def _parse(request, exclude_default: bool) -> LlmRequest:
        return parse_request(batched.input_getter(request), exclude_default)

    def _final(self, req: LlmRequest, handles: list[Handle]):
        """The last response of a request: its output, its error, or the cancellation error."""
        failed = batched.failure_response(handles)
        if failed is not None:
            return failed
        return None if req.streaming else self._response(output_arrays(req, [h.tokens for h in handles]))

    def _start(self, request, send, finish, is_cancelled) -> None:
        """Parse ``request`` and queue it on the engine; ``finish`` gets its last response (engine thread)."""
        req = self._parse(request, self.exclude_default)
        if req.streaming and send is None:
            raise ValueError("streaming needs the model deployed with decoupled: true")
        if req.streaming and len(req.prompts) != 1:
            raise ValueError("streaming takes one prompt per request")

        def on_token(_row: int, token: int) -> None:  # engine thread; an exception cancels the request
            if token != req.end_id:
                one = np.array([[[token]]], dtype=np.int32)
                send(self._response({"output_ids": one, "sequence_length": np.array([[1]], np.int32)}))

        def on_done(handles: list[Handle]) -> None:  # engine thread
            batched.finish_with(finish, lambda: self._final(req, handles))

        self.llm.submit(req, on_token if req.streaming else None, on_done, is_cancelled)

    def execute(self, requests):
        return batched.execute(requests, self.decoupled, self._start)

    def finalize(self) -> None:
        self.llm.close()
