"""Request bodies of ``/v1/completions`` and ``/v1/chat/completions`` (the subset the reference runtime honours;
anything it cannot do is refused, never ignored) and OpenAI-style error responses."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nasrt.runtime.generate import SamplingConfig

#: OpenAI error ``type`` per HTTP status.
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 422: "invalid_request_error",
               500: "internal_server_error", 503: "service_unavailable"}
#: the default ``max_tokens`` of ``/v1/completions`` in the OpenAI API (chat: the rest of the context).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16


class ApiError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}`` with HTTP ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored (clients send vendor extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, description="extension (trtllm-serve, vLLM): 0 = no limit")
    n: int = Field(1, ge=1, le=1, description="the reference runtime returns one choice per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    logprobs: Any = Field(None, description="not supported: must be absent, null or false")
    user: str | None = None
    ignore_eos: bool = Field(False, description="extension (trtllm-serve, vLLM): generate until max_tokens")

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling(self, max_new_tokens: int) -> SamplingConfig:
        """OpenAI semantics: temperature 0 is greedy; otherwise sample with top_p (1 = off) and top_k."""
        greedy = self.temperature == 0.0 or self.top_k == 1
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=self.temperature or 1.0,
                              top_k=1 if greedy else (self.top_k or 0), top_p=0.0 if self.top_p >= 1.0 else self.top_p,
                              seed=self.seed, stop_strings=self.stop_strings() or None,
                              end_id=[] if self.ignore_eos else None)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
