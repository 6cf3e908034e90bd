"""Stop words matched on decoded text, as users expect: ``--stop_words Paris`` ends generation at " Paris" although
the leading space makes it a different token than "Paris". One check, :func:`find_stop`, for every caller (the
reference generator, servers that stream text); :class:`TextStops` maps it back onto generated token ids."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nasrt.errors import ConfigError


def check_stop_strings(stop_strings: Sequence[str] | None, flag: str = "--stop_words") -> list[str]:
    """The stop strings as a list; each must be a non-empty string."""
    out = list(stop_strings or [])
    for s in out:
        if not isinstance(s, str) or not s:
            raise ConfigError(f"{flag}: {s!r} is not a non-empty string")
    return out


def find_stop(text: str, stop_strings: Sequence[str]) -> tuple[int | None, int]:
    """``(start, held)``: ``start`` is the index in ``text`` where the earliest stop string begins (None when none
    occurs); ``held`` is the length of the longest end of ``text`` that begins a stop string (not yet safe to show,
    0 when ``start`` is set)."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    if hits:
        return min(hits), 0
    held = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return None, held


class TextStops:
    """Text stop strings for one generated sequence of token ids; call :meth:`update` after each new token."""

    def __init__(self, stop_strings: Sequence[str], decode: Callable[[list[int]], str]) -> None:
        self.stop_strings = check_stop_strings(stop_strings)
        self.decode = decode
        self._ends: list[int] = []  # decoded length of the first k+1 tokens

    def _tokens_within(self, chars: int) -> int:
        """How many leading tokens decode to at most ``chars`` characters."""
        k = 0
        while k < len(self._ends) and self._ends[k] <= chars:
            k += 1
        return k

    def update(self, tokens: list[int]) -> tuple[int | None, int]:
        """``(keep, held)`` after ``tokens`` grew by one: ``keep`` = the number of tokens before the stop string
        (None when none occurred; a token that holds the start of a stop string is dropped with it); ``held`` =
        trailing tokens that may still turn out to be part of one."""
        tokens = list(tokens)
        del self._ends[max(len(tokens) - 1, 0):]
        while len(self._ends) < len(tokens) - 1:  # tokens added without an update
            self._ends.append(len(self.decode(tokens[:len(self._ends) + 1])))
        text = self.decode(tokens)
        self._ends.append(len(text))
        start, held = find_stop(text, self.stop_strings)
        if start is not None:
            return self._tokens_within(start), 0
        return None, len(tokens) - self._tokens_within(len(text) - held)
