"""The llmapi ``tensorrt_llm`` model for CPU machines: upstream's inputs and outputs, answered by nasrt's reference
runtime on the checkpoint ``model.yaml`` names (the HF dir or ModelOpt FP8 checkpoint the PyTorch backend loads).

``nasrt triton --backend pytorch --reference`` writes ``tensorrt_llm/1/model.py`` as a shim calling
:func:`model_class` with its ``model.yaml``. As upstream's model does, :meth:`auto_complete_config` takes
``max_batch_size`` and ``decoupled`` from ``model.yaml``'s ``triton_config``, and no chat template is applied to
``text_input``. Requests run on one shared batching engine (:mod:`nasrt.runtime.batcher`, driven through
:mod:`nasrt.deploy.triton.models.batched` as ``reference_llm`` is): concurrent requests decode together,
``sampling_param_max_tokens`` is bounded by the context (``max_seq_len`` of ``model.yaml`` where given), and a
request Triton reports cancelled is dropped at the next step. Streaming (``streaming: true``, decoupled) sends each
new piece of text as one response as soon as it is produced. Features the
reference runtime lacks (best_of, penalties, LoRA, images, log-probabilities, perf metrics) are refused with an error
instead of being ignored; ``stop_reason`` is returned empty.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nasrt.deploy.triton.models import batched
from nasrt.deploy.triton.models.batched import pb_utils  # Triton's Python-backend utils there, else None

if TYPE_CHECKING:
    from nasrt.runtime.batcher import Handle

log = logging.getLogger(__name__)

#: Upstream's LLM-API SamplingParams default for max_tokens.
DEFAULT_MAX_TOKENS = 32
#: rows decoded together when model.yaml names no max_batch_size
DEFAULT_BATCH = 8
#: Optional inputs and the value that means "feature off"; anything else is refused.
NEUTRAL = {"sampling_param_best_of": 1, "sampling_param_frequency_penalty": 0.0,
           "sampling_param_presence_penalty": 0.0, "sampling_param_return_perf_metrics": False,
           "return_cumulative_logprob": False}
UNSUPPORTED = ("image_url", "lora_id", "lora_name", "lora_path", "lora_ckpt_source")


@dataclass
class GenerateRequest:
    """One request, decoded from the llmapi input tensors."""

    text: str
    max_tokens: int = DEFAULT_MAX_TOKENS
    streaming: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    exclude_input: bool = False
    finish_reason: bool = False
    stop_reason: bool = False
    cancelled: bool = False


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def parse_request(get: Callable[[str], np.ndarray | None]) -> GenerateRequest:
    """Decode one request; ``get(name)`` returns the input as numpy or ``None`` when it was not sent."""
    text = get("text_input")
    if text is None or np.asarray(text).size != 1:
        raise ValueError("text_input must hold exactly one string")

    def one(name: str):
        a = get(name)
        return None if a is None else np.asarray(a).reshape(-1)[0].item()

    for name in UNSUPPORTED:
        if get(name) is not None:
            raise ValueError(f"{name} is not supported by the nasrt reference runtime")
    for name, neutral in NEUTRAL.items():
        value = one(name)
        if value is not None and value != neutral:
            raise ValueError(f"{name}={value} is not supported by the nasrt reference runtime (only {neutral})")
    max_tokens = one("sampling_param_max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"sampling_param_max_tokens must be >= 1, got {max_tokens}")
    stop = get("sampling_param_stop")
    return GenerateRequest(
        text=_text(np.asarray(text).reshape(-1)[0]),
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else int(max_tokens),
        streaming=bool(one("streaming") or False),
        temperature=one("sampling_param_temperature"), top_k=one("sampling_param_top_k"),
        top_p=one("sampling_param_top_p"), seed=one("sampling_param_seed"),
        stop=[_text(s) for s in np.asarray(stop).reshape(-1)] if stop is not None else [],
        exclude_input=bool(one("sampling_param_exclude_input_from_output") or False),
        finish_reason=bool(one("return_finish_reason") or False), stop_reason=bool(one("return_stop_reason") or False),
        cancelled=bool(one("stop") or False),
    )


def sampling(req: GenerateRequest):
    """The reference runtime's :class:`~nasrt.runtime.SamplingConfig`: greedy unless sampling was asked for."""
    from nasrt.runtime import SamplingConfig

    sampled = (req.temperature not in (None, 0.0)) or req.top_k not in (None, 1) or req.top_p not in (None, 0.0)
    top_k = (req.top_k if req.top_k is not None else 0) if sampled else 1
    return SamplingConfig(max_new_tokens=req.max_tokens, temperature=1.0 if req.temperature is None else
                          float(req.temperature), top_k=int(top_k), top_p=float(req.top_p or 0.0), seed=req.seed,
                          stop_strings=req.stop or None)


class LlmapiReference:
    """The model ``model.yaml`` names, its tokenizer, and one shared batching engine
    (:class:`~nasrt.runtime.batcher.BatchingEngine`) over the reference runtime."""

    def __init__(self, config: dict[str, Any]):
        from nasrt.runtime import load_model
        from nasrt.runtime.batcher import BatchingEngine
        from nasrt.runtime.text import load_tokenizer

        self.model_dir = str(config["model"])
        self.max_seq_len = int(config.get("max_seq_len") or 0) or None
        self.model = load_model(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir, flag="model")
        self._tok_lock = threading.Lock()  # the tokenizer is used from Triton's thread and the engine's
        batch = int(config.get("max_batch_size") or 0) or DEFAULT_BATCH
        self.engine = BatchingEngine(self.model, max_batch_size=batch, max_seq_len=self.max_seq_len).start()

    def encode(self, text: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        from nasrt.runtime.text import decode

        with self._tok_lock:
            return decode(self.tokenizer, ids)

    def submit(self, req: GenerateRequest, on_text: Callable[[str], None] | None = None,
               on_done: Callable[[Handle, str], None] | None = None,
               is_cancelled: Callable[[], bool] | None = None) -> Handle:
        """Queue ``req`` (validated first: errors are raised here). ``on_text`` receives each new final piece of
        text (streaming); ``on_done(handle, text)`` runs once with the whole generated text."""
        from nasrt.runtime.batcher import GenerationRequest

        ids = self.encode(req.text)
        if not ids:
            raise ValueError("text_input encodes to no tokens")
        context = self.engine.context
        if len(ids) >= context:
            where = f"max_seq_len {self.max_seq_len} (model.yaml)" if context == self.max_seq_len else \
                f"the model's context of {context} tokens"
            raise ValueError(f"text_input has {len(ids)} tokens, leaving no room for output within {where}")
        stream = batched.TextStream(self.decode) if on_text is not None else None

        def on_token(token: int) -> None:  # engine thread; an exception cancels the request
            piece = stream.push(token)
            if piece:
                on_text(piece)

        def done(handle: Handle) -> None:  # engine thread
            try:
                text = self.decode(handle.tokens) if handle.error is None else ""
            except Exception:  # noqa: BLE001 -- on_done must still run, or the request never ends
                log.exception("decoding the output of request %d failed", handle.id)
                text = ""
            if stream is not None and handle.finish_reason in ("stop", "length"):
                piece = stream.rest(text)
                try:
                    if piece:
                        on_text(piece)
                except Exception:  # noqa: BLE001 -- the client is gone; the final response says what it can
                    log.info("could not send the last piece of request %d", handle.id, exc_info=True)
            if on_done is not None:
                on_done(handle, text)

        request = GenerationRequest(ids, sampling(req), on_token=on_token if stream is not None else None,
                                    on_done=done, decode=self.decode, is_cancelled=is_cancelled)
        bounded = self.engine.check(request)
        if bounded < req.max_tokens:
            log.info("sampling_param_max_tokens %d bounded to %d by the context of %d tokens", req.max_tokens,
                     bounded, context)
        return self.engine.submit(request)

    def generate(self, req: GenerateRequest) -> tuple[str, str]:
        """Blocking: (text_output, finish_reason)."""
        handle = self.submit(req)
        handle.wait()
        return self.decode(handle.tokens), handle.finish_reason

    def close(self, timeout: float = 2.0) -> None:
        self.engine.close(timeout)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh)
    if not isinstance(data, dict) or not data.get("model"):
        raise ValueError(f"{path}: must be a mapping with 'model'")
    return data


def _strings(*values: str) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=object)


def model_class(model_yaml: Path) -> type:
    """The ``TritonPythonModel`` class for the repository whose ``1/model.yaml`` is ``model_yaml``."""

    class TritonPythonModel:
        """Triton entry points; decoupled or not as ``model.yaml``'s ``triton_config`` says."""

        @staticmethod
        def auto_complete_config(auto_complete_model_config):
            triton = _read_yaml(model_yaml).get("triton_config") or {}
            auto_complete_model_config.set_max_batch_size(int(triton.get("max_batch_size", 0)))
            auto_complete_model_config.set_model_transaction_policy({"decoupled": bool(triton.get("decoupled"))})
            return auto_complete_model_config

        def initialize(self, args: dict) -> None:
            import json

            batched.forward_logs()
            self.decoupled = pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))
            self.llm = LlmapiReference(_read_yaml(model_yaml))

        def _outputs(self, req: GenerateRequest, text: str, finish: str | None):
            tensors = [pb_utils.Tensor("text_output", _strings(text))]
            if req.finish_reason and finish is not None:
                tensors.append(pb_utils.Tensor("finish_reason", _strings(finish)))
            if req.stop_reason and finish is not None:
                tensors.append(pb_utils.Tensor("stop_reason", _strings("")))
            return pb_utils.InferenceResponse(output_tensors=tensors)

        def _start(self, request, send, finish, is_cancelled) -> None:
            """Parse ``request`` and queue it on the engine; ``finish`` gets its last response (engine thread)."""
            req = parse_request(batched.input_getter(request))
            if req.cancelled:
                finish(self._outputs(req, "", "cancelled"))
                return
            if req.streaming and send is None:
                raise ValueError("streaming needs triton_config.decoupled: true in model.yaml")
            prefix = "" if req.exclude_input else req.text
            first = [True]

            def on_text(piece: str) -> None:  # engine thread; an exception cancels the request
                send(self._outputs(req, (prefix if first[0] else "") + piece, None))
                first[0] = False

            def final(handle, text: str):
                failed = batched.failure_response([handle])
                if failed is not None:
                    return failed
                if not req.streaming:
                    return self._outputs(req, prefix + text, handle.finish_reason)
                return self._outputs(req, "", handle.finish_reason) if (req.finish_reason or req.stop_reason) else None

            def on_done(handle, text: str) -> None:  # engine thread
                batched.finish_with(finish, lambda: final(handle, text))

            self.llm.submit(req, on_text if req.streaming else None, on_done, is_cancelled)

        def execute(self, requests):
            return batched.execute(requests, self.decoupled, self._start)

        def finalize(self) -> None:
            self.llm.close()

    return TritonPythonModel
