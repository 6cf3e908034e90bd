"""``nasrt.eval.perplexity`` and ``nasrt eval perplexity`` against transformers' own loss on SmolLM2."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from nasrt.cli import main
from nasrt.convert import ConvertOptions, convert_checkpoint
from nasrt.errors import ConfigError
from nasrt.eval import perplexity
from nasrt.runtime import load_model
from nasrt.runtime.text import load_tokenizer
from nasrt.textdata import eval_text

TEXT = eval_text(600)


@pytest.fixture(scope="module")
def smol(smollm2, tmp_path_factory):
    ckpt = convert_checkpoint(smollm2, tmp_path_factory.mktemp("ppl") / "ckpt", ConvertOptions(dtype="float32"),
                              progress=False)
    return ckpt, load_model(ckpt), load_tokenizer(smollm2)


@pytest.fixture(scope="module")
def hf_llama(smollm2):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32).eval()


def test_perplexity_matches_transformers_loss(smol, hf_llama):
    _, model, tok = smol
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
    n = ids.shape[1]
    assert n > 40
    with torch.no_grad():
        want = math.exp(float(hf_llama(input_ids=ids, labels=ids).loss))
    got = perplexity(model, tok, TEXT, max_seq_len=n, progress=False)
    assert got == pytest.approx(want, rel=1e-4)
    assert 1.5 < got < 100  # a real language model on English documentation

    # two overlapping windows: every token from the second on is scored exactly once
    half = n // 2
    with torch.no_grad():
        a = hf_llama(input_ids=ids[:, : half + 1]).logits[0, :-1]
        b = hf_llama(input_ids=ids[:, half:]).logits[0, :-1]
    nll = F.cross_entropy(a, ids[0, 1: half + 1], reduction="sum") + F.cross_entropy(b, ids[0, half + 1:],
                                                                                       reduction="sum")
    windowed = perplexity(model, tok, TEXT, max_seq_len=half + 1, stride=half, progress=False)
    assert windowed == pytest.approx(math.exp(float(nll) / (n - 1)), rel=1e-4)


def test_eval_command_prints_perplexity(smol, smollm2, tmp_path, capsys):
    ckpt, model, tok = smol
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    rc = main(["eval", "perplexity", "--checkpoint_dir", str(ckpt), "--tokenizer_dir", str(smollm2), "--text",
               str(text), "--max_seq_len", "64"])
    assert rc == 0
    printed = float(re.search(r"perplexity ([0-9.]+)", capsys.readouterr().out).group(1))
    assert printed == pytest.approx(perplexity(model, tok, TEXT, max_seq_len=64, progress=False), abs=1e-4)


def test_perplexity_bad_input(smol):
    _, model, tok = smol
    with pytest.raises(ConfigError, match="fewer than two tokens"):
        perplexity(model, tok, "", progress=False)
    with pytest.raises(ConfigError, match="exceeds max_position_embeddings"):
        perplexity(model, tok, TEXT, max_seq_len=10**6, progress=False)
