"""A small reader of protobuf text format, enough for Triton ``config.pbtxt`` files (no ``tritonclient`` needed).

Every field maps to a list of values (fields may repeat); a value is a scalar string (quotes removed) or a nested
dict. ``${...}`` placeholders are read as bare scalars so that an unfilled template still parses.
"""

from __future__ import annotations

import re
from typing import Any

from nasrt.errors import ConfigError

_TOKEN = re.compile(r'''\s+|\#[^\n]*|(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')|(?P<ph>\$\{[^}]*\})'''
                    r'''|(?P<punct>[{}\[\]:,;<>])|(?P<word>[^\s{}\[\]:,;<>"'#]+)''')
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\"}

Message = dict[str, list[Any]]


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def _tokens(text: str, where: str) -> list[tuple[str, str, int]]:
    out, pos, line = [], 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ConfigError(f"{where}:{line}: cannot read protobuf text at {text[pos:pos + 20]!r}")
        kind = m.lastgroup
        if kind == "str":
            out.append(("str", _unquote(m.group()), line))
        elif kind in ("ph", "punct", "word"):
            out.append((kind, m.group(), line))
        line += m.group().count("\n")
        pos = m.end()
    return out


class _Parser:
    def __init__(self, tokens: list[tuple[str, str, int]], where: str):
        self.toks, self.i, self.where = tokens, 0, where

    def _peek(self) -> tuple[str, str, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def _fail(self, msg: str) -> ConfigError:
        tok = self._peek()
        return ConfigError(f"{self.where}:{tok[2] if tok else 'end'}: {msg}")

    def _take(self, value: str | None = None) -> tuple[str, str, int]:
        tok = self._peek()
        if tok is None or (value is not None and tok[1] != value):
            raise self._fail(f"expected {value or 'a token'}")
        self.i += 1
        return tok

    def message(self, close: str | None) -> Message:
        msg: Message = {}
        while True:
            tok = self._peek()
            if tok is None:
                if close is None:
                    return msg
                raise self._fail(f"missing {close!r}")
            if tok[1] == close:
                self.i += 1
                return msg
            if tok[0] != "word":
                raise self._fail(f"expected a field name, got {tok[1]!r}")
            self.i += 1
            name = tok[1]
            if self._peek() and self._peek()[1] == ":":
                self.i += 1
            values = self.value_list() if self._peek() and self._peek()[1] == "[" else [self.value()]
            msg.setdefault(name, []).extend(values)
            if self._peek() and self._peek()[1] in (",", ";"):
                self.i += 1

    def value(self) -> Any:
        tok = self._take()
        if tok[1] in ("{", "<"):
            return self.message("}" if tok[1] == "{" else ">")
        if tok[0] in ("str", "word", "ph"):
            return tok[1]
        raise self._fail(f"unexpected {tok[1]!r}")

    def value_list(self) -> list[Any]:
        self._take("[")
        out = []
        while self._peek() and self._peek()[1] != "]":
            out.append(self.value())
            if self._peek() and self._peek()[1] == ",":
                self.i += 1
        self._take("]")
        return out


def parse(text: str, where: str = "config.pbtxt") -> Message:
    """Parse protobuf text; :class:`ConfigError` with the line on malformed input."""
    return _Parser(_tokens(text, where), where).message(None)


def first(msg: Message, key: str, default: Any = None) -> Any:
    values = msg.get(key) or []
    return values[0] if values else default


def parameters(msg: Message) -> dict[str, str]:
    """``parameters { key: ... value: { string_value: ... } }`` entries as a dict."""
    out = {}
    for entry in msg.get("parameters", []):
        if isinstance(entry, dict):
            value = first(entry, "value", {})
            out[str(first(entry, "key", ""))] = str(first(value, "string_value", "")) if isinstance(value, dict) else ""
    return out
