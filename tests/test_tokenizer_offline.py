"""A real Nemotron-NAS HF dir as ``--tokenizer_dir`` (issue 8 §6a): ``model_type: nemotron-nas``, an ``auto_map``
to remote code that is not there, ``tokenizer_class: PreTrainedTokenizerFast``. run, triton, quantize and eval all
load its tokenizer from the tokenizer's own files, offline (no socket may connect), without ``AutoTokenizer`` /
``AutoConfig`` (which would read the unknown model config or ask to run remote code), chat template preserved."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import pytest

from nasrt.arch import load_spec
from nasrt.cli import main
from nasrt.errors import ConfigError
from nasrt.quantize.tiny_tokenizer import write_tiny_tokenizer
from nasrt.tokenizer import load_tokenizer_files

AUTO_MAP = {"AutoConfig": "configuration_decilm.DeciLMConfig",
            "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
PROMPT = "What is the capital of France?"


def nas_tokenizer_dir(src: Path, dst: Path) -> Path:
    """``src``'s tokenizer files under a nemotron-nas config.json with auto_map and block_configs (no .py files)."""
    dst.mkdir(parents=True)
    for name in ("tokenizer.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    spec = load_spec(src)
    group = spec.num_attention_heads // spec.layers[0].attention.num_kv_heads
    mult = 3 * spec.layers[0].ffn.intermediate_size / (2 * spec.hidden_size)
    block = {"attention": {"n_heads_in_group": group, "no_op": False, "replace_with_linear": False},
             "ffn": {"ffn_mult": mult, "no_op": False, "replace_with_linear": False}}
    cfg.update(model_type="nemotron-nas", architectures=["DeciLMForCausalLM"], auto_map=AUTO_MAP,
               block_configs=[block] * spec.num_layers)
    for key in ("num_key_value_heads", "intermediate_size"):
        cfg.pop(key, None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    assert not list(dst.glob("*.py"))
    return dst


@pytest.fixture()
def offline(monkeypatch):
    """No network, no AutoTokenizer / AutoConfig: the loader must get by with the tokenizer's own files."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("AutoTokenizer / AutoConfig must not be used for a tokenizer with a tokenizer.json")

    def no_network(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def nas_tok(smollm2, tmp_path_factory) -> Path:
    return nas_tokenizer_dir(smollm2, tmp_path_factory.mktemp("nas_tok") / "Llama-3_1-Nemotron-51B-Instruct")


@pytest.fixture(scope="module")
def smol_ckpt(smollm2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smol_ck") / "ck"
    assert main(["convert", "--model_dir", str(smollm2), "--output_dir", str(out), "--dtype", "bfloat16"]) == 0
    return out


def test_same_tokenizer_as_transformers(smollm2, nas_tok):
    """Before the trap: the loader gives what AutoTokenizer gives on the plain model (ids, specials, template)."""
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(smollm2))
    tok = load_tokenizer_files(nas_tok)
    text = f"{PROMPT} <|im_start|>caf\u00e9 \u4e16\u754c<|im_end|>"
    assert tok(text)["input_ids"] == ref(text)["input_ids"]
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (ref.eos_token_id, ref.bos_token_id,
                                                                       ref.pad_token_id)
    msgs = [{"role": "user", "content": PROMPT}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = ref(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_loader_offline_without_auto_classes(nas_tok, offline):
    tok = load_tokenizer_files(nas_tok)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_chat_template_from_tokenizer_config(nas_tok, tmp_path, offline):
    d = tmp_path / "t"
    shutil.copytree(nas_tok, d)
    template = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer_files(d).chat_template == template


def test_unreadable_tokenizer_files_are_config_errors(nas_tok, tmp_path, offline):
    d = tmp_path / "t"
    shutil.copytree(nas_tok, d)
    (d / "tokenizer_config.json").write_bytes('{"eos_token": "x"}'.encode("utf-16"))
    with pytest.raises(ConfigError, match="tokenizer_config.json: not a UTF-8 JSON file"):
        load_tokenizer_files(d)
    (d / "tokenizer_config.json").unlink()
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load tokenizer.json"):
        load_tokenizer_files(d)


def test_run(smol_ckpt, nas_tok, offline, capsys):
    rc = main(["run", "--checkpoint_dir", str(smol_ckpt), "--tokenizer_dir", str(nas_tok), "--input_text", PROMPT,
               "--max_output_len", "4", "--chat", "--no-streaming"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Output" in out and PROMPT in out


def test_eval(smol_ckpt, nas_tok, offline, capsys):
    rc = main(["eval", "perplexity", "--checkpoint_dir", str(smol_ckpt), "--tokenizer_dir", str(nas_tok),
               "--max_chars", "300", "--max_seq_len", "32"])
    assert rc == 0
    assert "perplexity" in capsys.readouterr().out


def _load_model_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_triton_repository(smol_ckpt, nas_tok, tmp_path, offline, capsys):
    repo = tmp_path / "repo"
    rc = main(["triton", "--reference", "--checkpoint_dir", str(smol_ckpt), "--tokenizer_dir", str(nas_tok),
               "--output_dir", str(repo), "--max_seq_len", "256"])
    assert rc == 0, capsys.readouterr().err
    for model in ("preprocessing", "postprocessing"):
        copy = repo / model / "1" / "nasrt_tokenizer.py"
        assert copy.read_text() == (Path(__file__).parents[1] / "nasrt" / "tokenizer.py").read_text()
    # the generated models, loaded from the repository files, tokenize with the copy beside them
    pre = _load_model_file(repo / "preprocessing" / "1" / "model.py", "gen_pre").Preprocessor(str(nas_tok))
    post = _load_model_file(repo / "postprocessing" / "1" / "model.py", "gen_post").Postprocessor(str(nas_tok))
    ids = pre.encode(PROMPT, chat=True)
    assert pre.end_id == 2 and len(ids) > 10
    import numpy as np

    text = post(np.array([[ids]]), np.array([[len(ids)]]))[0, 0].decode()
    assert PROMPT in text


def test_quantize(synthetic, tmp_path, offline):
    """quantize with --tokenizer_dir a nemotron-nas dir (the all-variants model's own tokenizer there)."""
    tok_src = tmp_path / "tiny"
    shutil.copytree(synthetic, tok_src)
    write_tiny_tokenizer(tok_src, load_spec(synthetic).vocab_size)
    nas = tok_src  # the synthetic model is nemotron-nas with an auto_map and no remote-code files
    cfg = json.loads((nas / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["auto_map"] and not list(nas.glob("*.py"))
    rc = main(["quantize", "--model_dir", str(synthetic), "--tokenizer_dir", str(nas), "--output_dir",
               str(tmp_path / "fp8"), "--calib_size", "2", "--calib_max_seq_length", "16"])
    assert rc == 0
    assert (tmp_path / "fp8" / "rank0.safetensors").is_file()
