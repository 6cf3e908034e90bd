"""Client of Triton's generate endpoint: ``POST /v2/models/<model>/generate`` and ``/generate_stream`` (SSE)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from nasrt.errors import NasrtError


def _text(value: Any) -> str:
    """``text_output`` comes back as a string, or as a (nested) list when the tensor has several elements."""
    if isinstance(value, list):
        return "".join(_text(v) for v in value)
    return "" if value is None else str(value)


def _error(response) -> str:
    try:
        body = response.json()
        return str(body.get("error", body))
    except ValueError:
        return response.text.strip()[:500]


def check_endpoint(url: str, timeout: float) -> str:
    """``url`` without a trailing slash, refused unless it is ``http(s)://host[:port][/path]``; ``timeout`` must be
    a finite number of seconds > 0."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise NasrtError(f"--url {url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NasrtError(f"--url {url!r} must look like http://HOST:PORT (e.g. http://127.0.0.1:8000)")
    if port == 0:
        raise NasrtError(f"--url {url!r}: port 0 is not a server port")
    if parts.query or parts.fragment:
        raise NasrtError(f"--url {url!r}: give the server address only, without '?' or '#'")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or timeout <= 0:
        raise NasrtError(f"--timeout {timeout!r} must be a number of seconds > 0")
    return url.rstrip("/")


def build_payload(text: str, max_tokens: int, stream: bool = False, chat: bool = False,
                  params: dict[str, Any] | None = None) -> dict[str, Any]:
    """JSON body: ensemble input names as keys (``text_input``, ``max_tokens``, optional sampling inputs)."""
    if max_tokens < 1:
        raise NasrtError(f"--max_tokens must be at least 1, got {max_tokens}")
    payload: dict[str, Any] = {"text_input": text, "max_tokens": int(max_tokens)}
    payload.update({k: v for k, v in (params or {}).items() if v is not None})
    if chat:
        payload["apply_chat_template"] = True
    if stream:
        payload["stream"] = True
    return payload


def _post(url: str, payload: dict[str, Any], timeout: float, stream: bool):
    import requests

    try:
        response = requests.post(url, json=payload, timeout=timeout, stream=stream)
    except requests.ConnectionError as exc:
        raise NasrtError(f"cannot reach Triton at {url} ({exc.__class__.__name__}); is the server running?") from None
    except requests.Timeout:
        raise NasrtError(f"no answer from {url} within {timeout:g} s") from None
    except requests.RequestException as exc:
        raise NasrtError(f"request to {url} failed: {exc}") from None
    if response.status_code != 200:
        raise NasrtError(f"{url}: HTTP {response.status_code}: {_error(response)}")
    return response


def stream_events(url: str, text: str, max_tokens: int, model: str = "ensemble", chat: bool = False,
                  params: dict[str, Any] | None = None, timeout: float = 300.0) -> Iterator[str]:
    """Yield each streamed ``text_output`` piece of ``POST /v2/models/<model>/generate_stream``."""
    endpoint = f"{check_endpoint(url, timeout)}/v2/models/{model}/generate_stream"
    response = _post(endpoint, build_payload(text, max_tokens, True, chat, params), timeout, stream=True)
    with response:
        for line in response.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data:"):
                continue
            event = json.loads(line[len("data:"):].strip())
            if "error" in event:
                raise NasrtError(f"{endpoint}: {event['error']}")
            yield _text(event.get("text_output"))


def generate(url: str, text: str, max_tokens: int = 64, model: str = "ensemble", stream: bool = False,
             chat: bool = False, params: dict[str, Any] | None = None, timeout: float = 300.0,
             on_text: Callable[[str], None] | None = None) -> str:
    """Send one prompt and return the generated text (``on_text`` sees each piece as it arrives)."""
    if stream:
        pieces = []
        for piece in stream_events(url, text, max_tokens, model, chat, params, timeout):
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)
        return "".join(pieces)
    endpoint = f"{check_endpoint(url, timeout)}/v2/models/{model}/generate"
    body = _post(endpoint, build_payload(text, max_tokens, False, chat, params), timeout, stream=False).json()
    if "error" in body:
        raise NasrtError(f"{endpoint}: {body['error']}")
    if "text_output" not in body:
        raise NasrtError(f"{endpoint}: the answer has no text_output (keys: {sorted(body)})")
    out = _text(body["text_output"])
    if on_text is not None:
        on_text(out)
    return out
