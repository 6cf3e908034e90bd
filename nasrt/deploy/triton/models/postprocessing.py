"""Triton ``postprocessing`` model: ``TOKENS_BATCH [batch, beam, tokens]`` -> ``OUTPUT [batch, beam]`` text.

Self-contained (numpy + transformers, and ``nasrt_tokenizer.py`` written beside it): this file is
copied verbatim into ``postprocessing/1/model.py``.
Parameters: ``tokenizer_dir`` (required), ``skip_special_tokens`` (default true). Only the first
``SEQUENCE_LENGTH`` tokens of each beam are decoded.
"""

from __future__ import annotations

import json

import numpy as np

try:  # only importable inside Triton's Python-backend stub
    import triton_python_backend_utils as pb_utils
except ImportError:
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


class Postprocessor:
    """Detokenizer logic, independent of Triton."""

    def __init__(self, tokenizer_dir: str, skip_special_tokens: bool = True) -> None:
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.skip_special_tokens = skip_special_tokens

    def __call__(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        if tokens.ndim == 2:  # [batch, tokens] -> one beam
            tokens = tokens[:, None, :]
        lengths = np.asarray(lengths).reshape(tokens.shape[0], tokens.shape[1])
        out = np.empty(tokens.shape[:2], dtype=object)
        for b in range(tokens.shape[0]):
            for beam in range(tokens.shape[1]):
                ids = tokens[b, beam, :int(lengths[b, beam])].tolist()
                text = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
                out[b, beam] = text.encode("utf-8")
        return out


class TritonPythonModel:
    """Triton entry points."""

    def initialize(self, args: dict) -> None:
        params = {k: v.get("string_value", "")
                  for k, v in (json.loads(args["model_config"]).get("parameters") or {}).items()}
        tokenizer_dir = params.get("tokenizer_dir", "")
        if not tokenizer_dir or tokenizer_dir.startswith("${"):
            raise ValueError("postprocessing: parameter tokenizer_dir is not set in config.pbtxt")
        skip = params.get("skip_special_tokens", "true").lower() != "false"
        self.post = Postprocessor(tokenizer_dir, skip_special_tokens=skip)

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            text = self.post(tokens, lengths)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT", text)]))
        return responses
