"""Triton ``preprocessing`` model: text -> token ids, word lists -> ``[2, n]`` id lists, end / pad ids.

Self-contained (numpy + transformers, and ``nasrt_tokenizer.py`` written beside it): this file is
copied verbatim into ``preprocessing/1/model.py``.
Parameters: ``tokenizer_dir`` (required; never downloads), ``add_special_tokens`` (default true),
``max_input_len`` and ``max_seq_len`` (the engine's limits; requests beyond them get an error naming the limit).
``APPLY_CHAT_TEMPLATE`` (nasrt addition) wraps the query as one user message with the tokenizer's chat template.
"""

from __future__ import annotations

import json

import numpy as np

try:  # only importable inside Triton's Python-backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # the pure helpers below stay importable (and testable) outside Triton
    pb_utils = None


def load_tokenizer(tokenizer_dir: str):
    """nasrt's one tokenizer loader (``nasrt/tokenizer.py``: the tokenizer's own files, offline, no remote code),
    loaded by path: the copy ``nasrt triton`` writes beside this ``model.py``, else (this file inside the nasrt
    source tree) the original."""
    import importlib.util
    from pathlib import Path

    here = Path(__file__).resolve()
    path = here.with_name("nasrt_tokenizer.py")
    if not path.is_file():
        path = here.parents[3] / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("nasrt_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_tokenizer_files(tokenizer_dir)


def model_parameters(model_config: dict) -> dict[str, str]:
    """``parameters`` of a parsed config, unfilled ``${...}`` placeholders treated as unset."""
    out = {}
    for key, value in (model_config.get("parameters") or {}).items():
        text = value.get("string_value", "")
        if text and not text.startswith("${"):
            out[key] = text
    return out


def to_word_list(id_lists: list[list[list[int]]]) -> np.ndarray:
    """Per batch row a list of words (each a list of ids) -> int32 ``[batch, 2, n]``.

    Row 0 holds the concatenated ids (padded with 0), row 1 the end offset of every word (padded with -1),
    as TensorRT-LLM's ``stop_words_list`` / ``bad_words_list`` expect.
    """
    flat, offsets = [], []
    for words in id_lists:
        ids: list[int] = []
        ends: list[int] = []
        for word in words:
            if word:
                ids.extend(word)
                ends.append(len(ids))
        flat.append(ids)
        offsets.append(ends)
    width = max([1] + [len(x) for x in flat])
    out = np.zeros((len(id_lists), 2, width), dtype=np.int32)
    out[:, 1, :] = -1
    for i, (ids, ends) in enumerate(zip(flat, offsets, strict=True)):
        out[i, 0, :len(ids)] = ids
        out[i, 1, :len(ends)] = ends
    return out


def as_text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Preprocessor:
    """Tokenizer logic, independent of Triton."""

    def __init__(self, tokenizer_dir: str, add_special_tokens: bool = True, max_input_len: int | None = None,
                 max_seq_len: int | None = None) -> None:
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.add_special_tokens = add_special_tokens
        self.max_input_len = max_input_len
        self.max_seq_len = max_seq_len
        eos = self.tokenizer.eos_token_id
        self.end_id = int(eos) if eos is not None else None
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.end_id

    def encode(self, query: str, chat: bool = False) -> list[int]:
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("apply_chat_template requested but the tokenizer has no chat template")
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                                      add_generation_prompt=True)
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return list(self.tokenizer.encode(query, add_special_tokens=self.add_special_tokens))

    def words(self, rows) -> np.ndarray:
        """``rows``: per batch row an iterable of strings (empty strings ignored) -> ``[batch, 2, n]``."""
        lists = [[self.tokenizer.encode(as_text(w), add_special_tokens=False) for w in row if as_text(w)]
                 for row in rows]
        return to_word_list(lists)

    def check_lengths(self, input_len: int, output_len: int) -> None:
        if input_len == 0:
            raise ValueError("text_input encodes to zero tokens")
        if output_len <= 0:
            raise ValueError(f"max_tokens must be positive, got {output_len}")
        if self.max_input_len is not None and input_len > self.max_input_len:
            raise ValueError(f"prompt has {input_len} tokens; the engine's max_input_len is {self.max_input_len}")
        if self.max_seq_len is not None and input_len + output_len > self.max_seq_len:
            raise ValueError(f"prompt ({input_len} tokens) + max_tokens ({output_len}) exceeds the engine's "
                             f"max_seq_len {self.max_seq_len}")

    def __call__(self, queries, output_lens, chat=None, end_ids=None, pad_ids=None, stop=None, bad=None) -> dict:
        """One Triton request (``batch`` rows) -> output arrays keyed by output name."""
        batch = len(queries)
        chat = [False] * batch if chat is None else [bool(c) for c in chat]
        ids = [self.encode(as_text(q), c) for q, c in zip(queries, chat, strict=True)]
        for row, out_len in zip(ids, output_lens, strict=True):
            self.check_lengths(len(row), int(out_len))
        end = [int(e) for e in end_ids] if end_ids is not None else [self.end_id] * batch
        pad = [int(p) for p in pad_ids] if pad_ids is not None else [self.pad_id] * batch
        if any(e is None for e in end):
            raise ValueError("the tokenizer has no eos_token; pass end_id with the request")
        pad = [p if p is not None else e for p, e in zip(pad, end, strict=True)]
        width = max(len(r) for r in ids)
        input_id = np.array([r + [pad[i]] * (width - len(r)) for i, r in enumerate(ids)], dtype=np.int32)
        return {
            "INPUT_ID": input_id,
            "REQUEST_INPUT_LEN": np.array([[len(r)] for r in ids], dtype=np.int32),
            "BAD_WORDS_IDS": self.words(bad if bad is not None else [[]] * batch),
            "STOP_WORDS_IDS": self.words(stop if stop is not None else [[]] * batch),
            "OUT_END_ID": np.array([[e] for e in end], dtype=np.int32),
            "OUT_PAD_ID": np.array([[p] for p in pad], dtype=np.int32),
        }


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _column(array):
    """``[batch, 1]`` (or ``[batch]``) -> list of ``batch`` scalars; ``None`` stays ``None``."""
    return None if array is None else [row for row in np.asarray(array).reshape(len(array), -1)[:, 0]]


class TritonPythonModel:
    """Triton entry points."""

    def initialize(self, args: dict) -> None:
        params = model_parameters(json.loads(args["model_config"]))
        if "tokenizer_dir" not in params:
            raise ValueError("preprocessing: parameter tokenizer_dir is not set in config.pbtxt")
        as_int = lambda k: int(params[k]) if k in params else None  # noqa: E731
        self.pre = Preprocessor(params["tokenizer_dir"],
                                add_special_tokens=params.get("add_special_tokens", "true").lower() == "true",
                                max_input_len=as_int("max_input_len"), max_seq_len=as_int("max_seq_len"))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                query = _input(request, "QUERY")
                outputs = self.pre(
                    _column(query), _column(_input(request, "REQUEST_OUTPUT_LEN")),
                    chat=_column(_input(request, "APPLY_CHAT_TEMPLATE")),
                    end_ids=_column(_input(request, "END_ID")), pad_ids=_column(_input(request, "PAD_ID")),
                    stop=_input(request, "STOP_WORDS_DICT"), bad=_input(request, "BAD_WORDS_DICT"))
                tensors = [pb_utils.Tensor(name, value) for name, value in outputs.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except (ValueError, UnicodeDecodeError) as exc:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[], error=pb_utils.TritonError(f"preprocessing: {exc}")))
        return responses
