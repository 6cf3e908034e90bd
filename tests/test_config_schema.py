"""Malformed HF / TensorRT-LLM ``config.json`` values (issue 8 §6b, issue 12 §3 and §8): every one is refused by
convert, inspect and plan alike with exit 2 and exactly one ``nasrt <command>: error:`` line that names the key,
no traceback, nothing written, and the input files byte-identical afterwards."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import pytest

from nasrt.arch import from_hf_config, from_trtllm_config, read_json
from nasrt.atomic import json_text, write_json
from nasrt.cli import main
from nasrt.config_schema import HF_FIELDS, TRTLLM_FIELDS, Kind
from nasrt.errors import ConfigError, NasrtError
from nasrt.presets import hf_config

COMMANDS = ("convert", "inspect", "plan")


def llama_config() -> dict:
    """A small plain-Llama config (SmolLM2-like shape)."""
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
            "num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128,
            "vocab_size": 300, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
            "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}


def nas_config() -> dict:
    return hf_config("0:g1/1.0 1:g2/2.0 2:L/N 3:N/L", hidden_size=64, num_attention_heads=8, vocab_size=300,
                     max_position_embeddings=512, bos_token_id=1, eos_token_id=2)


def digest(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def argv(command: str, model: Path, out: Path) -> list[str]:
    if command == "convert":
        return ["convert", "--model_dir", str(model), "--output_dir", str(out)]
    if command == "inspect":
        return ["inspect", str(model)]
    return ["plan", "--model", str(model)]


def refused(capsys, command: str, model: Path, tmp_path: Path, *needles: str) -> str:
    """Run ``command`` on ``model`` in-process and check the refusal contract; returns the error line."""
    before = digest(model)
    out = tmp_path / "out"
    rc = main(argv(command, model, out))
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"nasrt {command}: error: "), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != model.name] == []  # no temp sibling left either
    assert digest(model) == before
    return lines[0]


def write_cfg(d: Path, cfg: dict | bytes | str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    data = cfg if isinstance(cfg, bytes) else (cfg if isinstance(cfg, str) else json.dumps(cfg)).encode()
    (d / "config.json").write_bytes(data)
    return d


def _set(path: str, value):
    """A mutation setting ``a.b[2].c`` (dots and [index]) to ``value``."""
    def mutate(cfg: dict) -> None:
        keys: list = []
        for part in path.split("."):
            name, _, rest = part.partition("[")
            keys.append(name)
            if rest:
                keys.append(int(rest.rstrip("]")))
        node = cfg
        for k in keys[:-1]:
            node = node[k]
        if value is _DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = value
    return mutate


_DELETE = object()

#: (base config, mutation, text the error line must contain) — one row per malformed value.
CASES = {
    "hidden_size_string": (nas_config, _set("hidden_size", "64"), "hidden_size = '64' must be an integer"),
    "hidden_size_float": (nas_config, _set("hidden_size", 64.9), "hidden_size = 64.9 must be an integer"),
    "hidden_size_negative": (llama_config, _set("hidden_size", -64), "hidden_size = -64 must be an integer >= 1"),
    "heads_list": (nas_config, _set("num_attention_heads", [8]), "num_attention_heads = [8] must be an integer"),
    "heads_zero": (nas_config, _set("num_attention_heads", 0), "num_attention_heads = 0 must be an integer >= 1"),
    "heads_bool": (llama_config, _set("num_attention_heads", True), "num_attention_heads = True"),
    "layers_zero": (nas_config, _set("num_hidden_layers", 0), "num_hidden_layers = 0 must be an integer >= 1"),
    "layers_huge": (llama_config, _set("num_hidden_layers", 10**9), "num_hidden_layers = 1000000000"),
    "vocab_null": (llama_config, _set("vocab_size", None), "required key 'vocab_size' is missing"),
    "block_is_list": (nas_config, _set("block_configs[1]", [1, 2]), "block_configs[1] = [1, 2] must be a JSON object"),
    "block_is_string": (nas_config, _set("block_configs[0]", "attention"), "block_configs[0] = 'attention'"),
    "block_configs_string": (nas_config, _set("block_configs", "g8/1.0"), "block_configs = 'g8/1.0' must be a list"),
    "sub_block_list": (nas_config, _set("block_configs[2].ffn", ["no_op"]), "layer 2 ffn"),
    "ffn_mult_nan": (nas_config, _set("block_configs[0].ffn.ffn_mult", math.nan), "ffn_mult = nan"),
    "ffn_mult_inf": (nas_config, _set("block_configs[0].ffn.ffn_mult", math.inf), "ffn_mult = inf"),
    "ffn_mult_tiny": (nas_config, _set("block_configs[1].ffn.ffn_mult", 1e-300), "ffn_mult=1e-300"),
    "ffn_mult_huge": (nas_config, _set("block_configs[1].ffn.ffn_mult", 1e9), "ffn_mult = 1000000000.0"),
    "ffn_mult_string": (nas_config, _set("block_configs[1].ffn.ffn_mult", "2.0"), "ffn_mult = '2.0'"),
    "n_heads_in_group_float": (nas_config, _set("block_configs[0].attention.n_heads_in_group", 1.5),
                               "n_heads_in_group = 1.5"),
    "no_op_string": (nas_config, _set("block_configs[0].attention.no_op", "false"), "no_op = 'false'"),
    "tie_string": (llama_config, _set("tie_word_embeddings", "false"), "tie_word_embeddings = 'false' must be a JSON"),
    "rms_eps_nan": (llama_config, _set("rms_norm_eps", math.nan), "rms_norm_eps = nan"),
    "rms_eps_negative": (nas_config, _set("rms_norm_eps", -1e-5), "rms_norm_eps"),
    "rope_theta_inf": (llama_config, _set("rope_theta", math.inf), "rope_theta = inf"),
    "rope_factor_string": (nas_config, _set("rope_scaling", {"rope_type": "llama3", "factor": "8", "low_freq_factor": 1.0,
                                                             "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 64}),
                           "rope_scaling.factor = '8'"),
    "rope_parameters_list": (llama_config, _set("rope_parameters", [10000.0]), "rope_parameters = [10000.0]"),
    "eos_string": (llama_config, _set("eos_token_id", "two"), "eos_token_id = 'two'"),
    "eos_list_of_strings": (llama_config, _set("eos_token_id", [2, "x"]), "eos_token_id"),
    "eos_outside_vocab": (llama_config, _set("eos_token_id", 300), "eos_token_id = 300 is outside vocab_size 300"),
    "max_pos_float": (llama_config, _set("max_position_embeddings", 512.5), "max_position_embeddings = 512.5"),
    "unknown_model_type_with_blocks": (nas_config, _set("model_type", "mistral"), "model_type 'mistral'"),
    "nas_without_blocks": (nas_config, _set("block_configs", _DELETE), "needs 'block_configs'"),
    "missing_intermediate_size": (llama_config, _set("intermediate_size", _DELETE),
                                  "required key 'intermediate_size' is missing"),
    "model_type_list": (llama_config, _set("model_type", ["llama"]), "model_type = ['llama'] must be a string"),
    "hidden_act_int": (llama_config, _set("hidden_act", 3), "hidden_act = 3 must be a string"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_value_refused(case, command, tmp_path, capsys):
    base, mutate, needle = CASES[case]
    cfg = base()
    mutate(cfg)
    model = write_cfg(tmp_path / "model", cfg)
    refused(capsys, command, model, tmp_path, needle)


def test_misleading_messages_fixed():
    """Issue 12 §8: the message names the actual problem."""
    cfg = llama_config()
    del cfg["intermediate_size"]
    with pytest.raises(ConfigError) as info:
        from_hf_config(cfg)
    assert "intermediate_size" in str(info.value) and "not supported" not in str(info.value)
    cfg = nas_config()
    cfg["num_hidden_layers"] = 0
    with pytest.raises(ConfigError) as info:
        from_hf_config(cfg)
    assert "num_hidden_layers = 0" in str(info.value) and "--pp_size" not in str(info.value)


# ---- files that are not UTF-8 JSON objects -----------------------------------------------------------------------

def _deep(n: int) -> bytes:
    return b'{"hidden_size": 64, "rope_scaling": ' + b"[" * n + b"]" * n + b"}"


FILES = {
    "utf16": (lambda: json.dumps(llama_config()).encode("utf-16"), "UTF-16"),
    "utf16_no_bom": (lambda: json.dumps(llama_config()).encode("utf-16-le"), "UTF-16"),
    "latin1": (lambda: json.dumps({**llama_config(), "name": "caf\u00e9"}, ensure_ascii=False).encode("latin-1"),
               "not UTF-8"),
    "nested_deep": (lambda: _deep(200_000), "nested too deeply"),
    "top_level_list": (lambda: b"[1, 2]", "must hold a JSON object"),
    "invalid_json": (lambda: b'{"hidden_size": 64,', "invalid JSON"),
    "huge_int_literal": (lambda: b'{"hidden_size": ' + b"9" * 5000 + b"}", "invalid JSON value"),
    "empty": (lambda: b"", "invalid JSON"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(FILES))
def test_unreadable_config_file_refused(case, command, tmp_path, capsys):
    make, needle = FILES[case]
    model = write_cfg(tmp_path / "model", make())
    refused(capsys, command, model, tmp_path, "config.json", needle)


@pytest.mark.parametrize("command", COMMANDS)
def test_config_json_directory_refused(command, tmp_path, capsys):
    model = tmp_path / "model"
    (model / "config.json").mkdir(parents=True)
    (model / "x").write_text("keep")
    refused(capsys, command, model, tmp_path, "config.json", "not a regular file")


def test_nan_literal_parses_but_is_refused_where_read(tmp_path):
    """NaN / Infinity literals in a field nasrt does not read are harmless; in one it reads they are refused."""
    text = json.dumps(llama_config())[:-1] + ', "unused": NaN}'
    assert math.isnan(read_json(write_cfg(tmp_path / "a", text) / "config.json")["unused"])
    from_hf_config(read_json(tmp_path / "a" / "config.json"))
    text = json.dumps(llama_config()).replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN')
    with pytest.raises(ConfigError, match="rms_norm_eps = nan"):
        from_hf_config(read_json(write_cfg(tmp_path / "b", text) / "config.json"))


def test_json_written_strictly(tmp_path):
    """Every JSON file nasrt writes refuses NaN / Infinity instead of writing invalid JSON."""
    with pytest.raises(NasrtError, match="non-finite"):
        write_json(tmp_path / "x.json", {"norm_epsilon": math.nan})
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(NasrtError):
        json_text({"a": [math.inf]})
    assert json.loads(write_json(tmp_path / "y.json", {"a": 1.5}).read_text()) == {"a": 1.5}


def test_converted_config_is_strict_json(synthetic, tmp_path):
    """The TensorRT-LLM config.json convert writes parses with a parser that rejects NaN / Infinity."""
    assert main(["convert", "--model_dir", str(synthetic), "--output_dir", str(tmp_path / "ck")]) == 0

    def no_constants(name):
        raise AssertionError(f"non-finite constant {name} in output JSON")

    json.loads((tmp_path / "ck" / "config.json").read_text(), parse_constant=no_constants)


# ---- TensorRT-LLM checkpoint configs ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trt_cfg(synthetic, tmp_path_factory) -> dict:
    """The TensorRT-LLM config.json that convert writes for the all-variants model."""
    out = tmp_path_factory.mktemp("trt") / "ck"
    assert main(["convert", "--model_dir", str(synthetic), "--output_dir", str(out)]) == 0
    return json.loads((out / "config.json").read_text())


TRT_CASES = {
    "mapping_list": (_set("mapping", [1]), "mapping = [1] must be a JSON object"),
    "tp_string": (_set("mapping.tp_size", "2"), "mapping.tp_size = '2'"),
    "tp_zero": (_set("mapping.tp_size", 0), "mapping.tp_size = 0"),
    "layer_configs_string": (_set("layer_configs[0]", "mlp"), "layer_configs[0] = 'mlp' must be a JSON object"),
    "impl_unknown": (_set("layer_configs[0].attention.impl", "mamba"), "layer_configs[0].attention.impl"),
    "kv_heads_zero": (_set("layer_configs[0].attention.num_key_value_heads", 0), "num_key_value_heads = 0"),
    "norm_eps_nan": (_set("norm_epsilon", math.nan), "norm_epsilon = nan"),
    "tie_string": (_set("tie_word_embeddings", "no"), "tie_word_embeddings = 'no'"),
    "quantization_string": (_set("quantization", "FP8"), "quantization = 'FP8'"),
    "rotary_base_string": (_set("rotary_base", "1e4"), "rotary_base = '1e4'"),
}


@pytest.mark.parametrize("case", sorted(TRT_CASES))
def test_malformed_trtllm_config(case, trt_cfg, tmp_path, capsys):
    capsys.readouterr()
    mutate, needle = TRT_CASES[case]
    bad = copy.deepcopy(trt_cfg)
    mutate(bad)
    with pytest.raises(ConfigError) as info:
        from_trtllm_config(bad)
    assert needle in str(info.value)
    model = write_cfg(tmp_path / "model", bad)
    for command in ("inspect", "plan"):
        refused(capsys, command, model, tmp_path, needle)


def test_schema_tables_cover_what_arch_reads():
    """The schema tables hold every top-level key the parsers read (pinned here; a new read needs a row)."""
    hf_read = {"model_type", "hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "head_dim",
               "intermediate_size", "num_key_value_heads", "num_key_value_heads_per_layer", "block_configs",
               "attention_bias", "mlp_bias", "hidden_act", "rms_norm_eps", "rope_theta", "rope_parameters",
               "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "torch_dtype", "dtype",
               "bos_token_id", "eos_token_id"}
    assert set(HF_FIELDS) == hf_read
    assert {"mapping", "quantization", "layer_configs", "norm_epsilon", "rotary_base"} <= set(TRTLLM_FIELDS)
    assert HF_FIELDS["tie_word_embeddings"].kind is Kind.BOOL and HF_FIELDS["hidden_size"].kind is Kind.INT
