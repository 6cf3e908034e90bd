"""Offline text: CPython's bundled documentation (``pydoc_data.topics``) split into disjoint calibration and
evaluation slices, so FP8 calibration and perplexity work without a network."""

from __future__ import annotations

import re
from functools import lru_cache

#: Topics whose sorted index satisfies ``i % EVAL_EVERY == EVAL_EVERY - 1`` are held out for evaluation.
EVAL_EVERY = 5
#: pydoc repeats whole sections under several topics ("in" and "comparisons", ...): a calibration passage sharing
#: any window of this many characters with the evaluation slice is skipped, or the held-out text would not be held
#: out (45 of the 1,128 passages; ``quantize.py`` refuses such overlap at the token level).
OVERLAP_CHARS = 48


def _topics() -> list[tuple[str, str]]:
    import pydoc_data.topics as t

    return [(k, re.sub(r"[ \t]+\n", "\n", t.topics[k]).strip()) for k in sorted(t.topics)]


def pydoc_texts(split: str) -> list[str]:
    """Documents of the ``"calib"`` or ``"eval"`` slice (disjoint, deterministic)."""
    if split not in ("calib", "eval"):
        raise ValueError(f"split must be 'calib' or 'eval', got {split!r}")
    held_out = split == "eval"
    return [text for i, (_, text) in enumerate(_topics()) if (i % EVAL_EVERY == EVAL_EVERY - 1) == held_out]


@lru_cache(maxsize=1)
def _eval_windows() -> frozenset[str]:
    text = eval_text()
    return frozenset(text[k:k + OVERLAP_CHARS] for k in range(len(text) - OVERLAP_CHARS + 1))


def overlaps_eval(passage: str) -> bool:
    """Whether ``passage`` shares an :data:`OVERLAP_CHARS`-character window with the evaluation slice."""
    seen = _eval_windows()
    return any(passage[k:k + OVERLAP_CHARS] in seen for k in range(len(passage) - OVERLAP_CHARS + 1))


def calibration_texts(n: int, min_chars: int = 200) -> list[str]:
    """Up to ``n`` calibration passages: calib-slice documents cut into paragraphs of at least ``min_chars``,
    without the passages pydoc repeats from the evaluation slice."""
    out: list[str] = []
    for doc in pydoc_texts("calib"):
        buf = ""
        for para in doc.split("\n\n"):
            buf = f"{buf}\n\n{para}" if buf else para
            if len(buf) >= min_chars:
                if not overlaps_eval(buf):
                    out.append(buf)
                buf = ""
                if len(out) >= n:
                    return out
    return out


def eval_text(max_chars: int | None = None) -> str:
    """The held-out evaluation text (eval-slice documents joined), optionally truncated."""
    text = "\n\n".join(pydoc_texts("eval"))
    return text[:max_chars] if max_chars else text
