"""The FastAPI application of ``nasrt serve``: ``/health``, ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (``stream: true`` as server-sent events), answered by one shared
:class:`~nasrt.runtime.batcher.BatchingEngine`. Responses are built from the ``openai`` package's own types;
errors are OpenAI-style JSON bodies; a client that disconnects has its request cancelled."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from openai.types import Completion, CompletionChoice, CompletionUsage, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice as ChatChoice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta

from nasrt.deploy.serve.protocol import ApiError, ChatRequest, CompletionRequest, _Sampling, error_body
from nasrt.deploy.serve.text import IncrementalText, chat_prompt, completion_prompts
from nasrt.errors import NasrtError
from nasrt.runtime.batcher import ERROR, BatchingEngine, GenerationRequest, Handle
from nasrt.runtime.text import decode

log = logging.getLogger(__name__)

#: how often a non-streaming request checks whether its client is still connected (seconds).
DISCONNECT_POLL_S = 0.25


@dataclass
class ServedModel:
    """What the endpoints need: the engine, the tokenizer and the name clients use."""

    engine: BatchingEngine
    tokenizer: Any
    name: str
    created: int

    def text(self, ids: list[int]) -> str:
        return decode(self.tokenizer, ids)


class _Job:
    """One engine request seen from the event loop: finish future and (for streaming) a queue of text pieces."""

    def __init__(self, served: ServedModel, prompt: list[int], req: _Sampling, max_tokens: int | None,
                 stream: bool) -> None:
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[Handle] = loop.create_future()
        self.pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self.text = IncrementalText(served.tokenizer) if stream else None
        engine = served.engine
        if len(prompt) >= engine.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; this model's context is {engine.context} "
                           "tokens (prompt + completion)", "messages" if isinstance(req, ChatRequest) else "prompt",
                           "context_length_exceeded")
        wanted = engine.context if max_tokens is None else max_tokens

        def on_token(tok: int) -> None:  # engine thread
            piece = self.text.push(tok)
            if piece:
                loop.call_soon_threadsafe(self.pieces.put_nowait, piece)

        def on_done(handle: Handle) -> None:  # engine thread
            loop.call_soon_threadsafe(self._finished, handle)

        request = GenerationRequest(prompt, req.sampling(engine.bounded_max_tokens(len(prompt), wanted)),
                                    on_token=on_token if stream else None, on_done=on_done,
                                    decode=served.text)
        try:
            self.handle = engine.submit(request)
        except NasrtError as exc:
            raise ApiError(400, str(exc)) from None

    def _finished(self, handle: Handle) -> None:
        if not self.done.done():
            self.done.set_result(handle)
        self.pieces.put_nowait(None)

    async def wait(self, request: Request) -> Handle:
        """The finished handle; cancels the engine request when the client disconnects meanwhile."""
        try:
            while True:
                try:
                    handle = await asyncio.wait_for(asyncio.shield(self.done), DISCONNECT_POLL_S)
                    break
                except TimeoutError:
                    if await request.is_disconnected():
                        self.handle.cancel()
                        raise ApiError(499, "the client closed the connection; request cancelled") from None
        finally:
            if not self.done.done():
                self.handle.cancel()
        if handle.finish_reason == ERROR:
            raise ApiError(500, f"generation failed: {handle.error}")
        return handle

    async def stream(self) -> AsyncIterator[str]:
        """Text pieces as they are generated, then the final rest of the text."""
        while (piece := await self.pieces.get()) is not None:
            yield piece
        handle = self.done.result()
        if handle.finish_reason == ERROR:
            raise ApiError(500, f"generation failed: {handle.error}")
        rest = self.text.finish(handle.tokens)
        if rest:
            yield rest


def _usage(handles: list[Handle]) -> CompletionUsage:
    prompt = sum(h.prompt_tokens for h in handles)
    completion = sum(len(h.tokens) for h in handles)
    return CompletionUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _check(served: ServedModel, req: _Sampling) -> None:
    if req.model != served.name:
        raise ApiError(404, f"The model `{req.model}` does not exist (this server serves `{served.name}`).",
                       "model", "model_not_found")
    if req.logprobs not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported by the nasrt reference runtime", "logprobs")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj.model_dump(mode='json', exclude_unset=True))}\n\n"


def _log_done(kind: str, rid: str, handles: list[Handle], started: float) -> None:
    took = time.monotonic() - started
    out = sum(len(h.tokens) for h in handles)
    reasons = ",".join(str(h.finish_reason) for h in handles)
    log.info("%s %s: %d prompt + %d completion tokens in %.2f s (%.1f tok/s), finish %s", kind, rid,
             sum(h.prompt_tokens for h in handles), out, took, out / took if took > 0 else 0.0, reasons)


def _finish_reason(handle: Handle) -> str:
    return "length" if handle.finish_reason == "length" else "stop"


def _event_stream(kind: str, rid: str, started: float, job: _Job, body: _Sampling, opening: list[str],
                  chunk: Callable[..., str]) -> StreamingResponse:
    """Server-sent events of one streamed job: ``opening``, ``chunk(piece)`` per text piece, ``chunk(None, finish)``,
    ``chunk(None, usage=...)`` when asked, ``[DONE]``; an error becomes an error event, and the job is cancelled
    when the client goes away before it finished."""

    async def events() -> AsyncIterator[str]:
        try:
            for first in opening:
                yield first
            async for piece in job.stream():
                yield chunk(piece)
            handle = job.done.result()
            yield chunk(None, _finish_reason(handle))
            if body.stream_options is not None and body.stream_options.include_usage:
                yield chunk(None, usage=_usage([handle]))
            yield "data: [DONE]\n\n"
            _log_done(kind, rid, [handle], started)
        except ApiError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
        finally:
            if not job.handle.done:
                job.handle.cancel()
                log.info("%s %s: client went away; request cancelled", kind, rid)

    return StreamingResponse(events(), media_type="text/event-stream")


def create_app(served: ServedModel) -> FastAPI:
    """The FastAPI application serving ``served``."""
    app = FastAPI(title="nasrt serve", summary="OpenAI-compatible API over nasrt's reference runtime")

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        log.info("request refused (%d): %s", exc.status, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
                            for e in exc.errors())
        log.info("request refused (422): %s", message)
        return JSONResponse(error_body(422, message, where), status_code=422)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        model = Model(id=served.name, created=served.created, object="model", owned_by="nasrt")
        return JSONResponse({"object": "list", "data": [model.model_dump(mode="json", exclude_unset=True)]})

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        _check(served, body)
        rid, created, started = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), time.monotonic()
        prompt = chat_prompt(served.tokenizer, body.messages)
        job = _Job(served, prompt, body, body.requested_max_tokens(), body.stream)
        log.info("chat %s: %d prompt tokens, max_tokens %d, stream %s", rid, len(prompt), job.handle.max_new_tokens,
                 body.stream)
        if not body.stream:
            handle = await job.wait(request)
            _log_done("chat", rid, [handle], started)
            message = ChatCompletionMessage(role="assistant", content=served.text(handle.tokens))
            result = ChatCompletion(id=rid, created=created, model=served.name, object="chat.completion",
                                    choices=[ChatChoice(index=0, message=message,
                                                        finish_reason=_finish_reason(handle))],
                                    usage=_usage([handle]))
            return JSONResponse(result.model_dump(mode="json", exclude_unset=True))

        def chunk(delta: ChoiceDelta, finish: str | None = None, usage=None) -> str:
            choices = [] if usage is not None else [ChunkChoice(index=0, delta=delta, finish_reason=finish)]
            return _sse(ChatCompletionChunk(id=rid, created=created, model=served.name,
                                            object="chat.completion.chunk", choices=choices, usage=usage))

        return _event_stream("chat", rid, started, job, body,
                             [chunk(ChoiceDelta(role="assistant", content=""))],
                             lambda text, finish=None, usage=None: chunk(
                                 ChoiceDelta() if text is None else ChoiceDelta(content=text), finish, usage))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check(served, body)
        rid, created, started = f"cmpl-{uuid.uuid4().hex}", int(time.time()), time.monotonic()
        prompts = completion_prompts(served.tokenizer, body.prompt)
        if body.stream and len(prompts) != 1:
            raise ApiError(400, "stream: true takes one prompt per request", "prompt")
        jobs = [_Job(served, p, body, body.max_tokens, body.stream) for p in prompts]
        log.info("completion %s: %d prompt(s) of %s tokens, max_tokens %s, stream %s", rid, len(prompts),
                 [len(p) for p in prompts], body.max_tokens, body.stream)
        echo = [served.text(p) if body.echo else "" for p in prompts]
        if not body.stream:
            handles = list(await asyncio.gather(*(j.wait(request) for j in jobs)))
            _log_done("completion", rid, handles, started)
            choices = [CompletionChoice(index=i, text=echo[i] + served.text(h.tokens),
                                        finish_reason=_finish_reason(h)) for i, h in enumerate(handles)]
            result = Completion(id=rid, created=created, model=served.name, object="text_completion",
                                choices=choices, usage=_usage(handles))
            return JSONResponse(result.model_dump(mode="json", exclude_unset=True))
        job = jobs[0]

        def chunk(text: str, finish: str | None = None, usage=None) -> str:
            choices = [] if usage is not None else [CompletionChoice.model_construct(index=0, text=text,
                                                                                     finish_reason=finish)]
            return _sse(Completion.model_construct(id=rid, created=created, model=served.name,
                                                   object="text_completion", choices=choices, usage=usage))

        return _event_stream("completion", rid, started, job, body, [chunk(echo[0])] if echo[0] else [],
                             lambda text, finish=None, usage=None: chunk("" if text is None else text, finish, usage))

    return app
