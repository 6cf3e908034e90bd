"""What both Triton reference models (``reference_llm``, ``llmapi_reference``) share: the request loop that hands
``execute``'s requests to nasrt's batching engine (:mod:`nasrt.runtime.batcher`), Triton's cancellation polling,
text-streaming of decoded pieces, the final response of a failed or cancelled request, and forwarding nasrt's log
into Triton's.

A model supplies ``start(request, send, finish, is_cancelled)``: it parses the request, submits it to the engine
(errors raised there are answered as one error response) and arranges for ``finish(response)`` to run exactly once
when the request ends (``None``: no final payload). ``send`` is the response sender's ``send`` when the model is
decoupled (streaming pieces go there as they are produced), ``None`` otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from nasrt.errors import NasrtError

try:  # only importable inside Triton's Python-backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:
    pb_utils = None

log = logging.getLogger(__name__)

#: exceptions answered as an error response (anything else is a bug and propagates to Triton)
REQUEST_ERRORS = (ValueError, NasrtError)

Send = Callable[[Any], None]
Finish = Callable[[Any], None]
Start = Callable[[Any, "Send | None", Finish, "Callable[[], bool] | None"], None]


def error_response(exc: BaseException | str):
    """A response carrying only ``tensorrt_llm: <exc>`` as its error."""
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"tensorrt_llm: {exc}"))


def cancelled_response():
    """The response for a request Triton (or a dead response sender) cancelled."""
    code = getattr(pb_utils.TritonError, "CANCELLED", None)
    message = "tensorrt_llm: request cancelled"
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def failure_response(handles: Sequence[Any]):
    """The final response of finished :class:`~nasrt.runtime.batcher.Handle` s when one was cancelled or failed;
    ``None`` when all succeeded."""
    if any(h.finish_reason == "cancelled" for h in handles):
        return cancelled_response()
    failed = next((h.error for h in handles if h.error is not None), None)
    return None if failed is None else error_response(failed)


def input_getter(request: Any) -> Callable[[str], Any]:
    """``get(name)``: the request's input ``name`` as numpy, or ``None`` when it was not sent."""

    def get(name: str):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    return get


def finish_with(finish: Finish, build: Callable[[], Any]) -> None:
    """``finish(build())``; a failure while building the response is answered as an error, so the request always
    ends (a non-decoupled ``execute`` waits for it)."""
    try:
        response = build()
    except Exception as exc:  # noqa: BLE001 -- answered to the client, and logged
        log.exception("building the final response failed")
        response = error_response(exc)
    finish(response)


def cancel_poll(request: Any, sender: Any = None) -> Callable[[], bool] | None:
    """Triton's ``is_cancelled`` for this request (the response sender's when decoupled), polled by the engine at
    every step; ``None`` on Triton versions without it."""
    return getattr(sender, "is_cancelled", None) or getattr(request, "is_cancelled", None)


class TextStream:
    """Generated token ids -> new pieces of text, each sent once: a piece is held back while the decoded text ends in
    an incomplete character (``\\ufffd``) or does not extend what was already sent."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.sent = ""

    def _take(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece

    def push(self, token: int) -> str:
        """Add one token; the new final text ("" when nothing can be sent yet)."""
        self.ids.append(token)
        text = self.decode(self.ids)
        return "" if text.endswith("\ufffd") else self._take(text)

    def rest(self, text: str) -> str:
        """What of the request's final ``text`` was not sent yet."""
        return self._take(text)


class TritonLogHandler(logging.Handler):
    """Forwards nasrt's log records into Triton's own log (``pb_utils.Logger``), so request admissions and
    cancellations show in the server log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            if record.levelno >= logging.ERROR:
                pb_utils.Logger.log_error(message)
            elif record.levelno >= logging.WARNING:
                pb_utils.Logger.log_warn(message)
            else:
                pb_utils.Logger.log_info(message)
        except Exception:  # noqa: BLE001 -- logging must never break serving
            self.handleError(record)


def forward_logs() -> None:
    """Install :class:`TritonLogHandler` on the ``nasrt`` logger (once per process)."""
    nasrt_log = logging.getLogger("nasrt")
    if not any(isinstance(h, TritonLogHandler) for h in nasrt_log.handlers):
        handler = TritonLogHandler()
        handler.setFormatter(logging.Formatter("nasrt %(name)s: %(message)s"))
        nasrt_log.addHandler(handler)
        nasrt_log.setLevel(logging.INFO)


def _final_sender(sender: Any) -> Finish:
    flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL

    def finish(response: Any) -> None:
        try:
            if response is None:
                sender.send(flags=flags)
            else:
                sender.send(response, flags=flags)
        except Exception:  # noqa: BLE001 -- the client is gone; nothing is left to answer
            log.info("could not send the final response (the client has gone)", exc_info=True)

    return finish


def execute(requests: Sequence[Any], decoupled: bool, start: Start) -> None:
    """Triton's ``execute`` over the batching engine: every request is started and ``execute`` returns at once;
    responses go through each request's response sender from the engine thread, so requests arriving meanwhile
    join the running batch. That holds for non-decoupled models too (Triton's Python backend accepts one final
    response through the sender there, measured on Triton 2.51); only decoupled ones get ``send`` for streaming."""
    for request in requests:
        sender = request.get_response_sender()
        finish = _final_sender(sender)
        try:
            start(request, sender.send if decoupled else None, finish, cancel_poll(request, sender))
        except REQUEST_ERRORS as exc:
            finish(error_response(exc))
    return None
