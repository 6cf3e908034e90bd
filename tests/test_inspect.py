"""``nasrt inspect``: per-layer table and totals for HF dirs, TensorRT-LLM checkpoints and engine configs."""

from __future__ import annotations

import json

import pytest

from nasrt.cli import main
from nasrt.convert import ConvertOptions, convert_checkpoint
from nasrt.fixtures import write_config_only
from nasrt.inspect import format_inspection, inspect_model


@pytest.fixture(scope="module")
def cfg51(tmp_path_factory):
    return write_config_only("nemotron-51b", tmp_path_factory.mktemp("cfg") / "nemotron-51b")


def test_51b_counts(cfg51):
    ins = inspect_model(cfg51)
    assert ins.source == "hf" and len(ins.layers) == 80
    assert ins.attention_counts == {"attention": 54, "linear": 18, "no_op": 8}
    assert ins.ffn_counts == {"mlp": 80, "linear": 0, "no_op": 0}
    assert ins.kv_heads_total == 371
    assert ins.kv_heads_histogram == {8: 44, 4: 1, 2: 6, 1: 3}
    assert ins.params == sum(r.params for r in ins.layers) + 2 * 128256 * 8192 + 8192
    assert ins.params == pytest.approx(51.50e9, rel=5e-4)
    assert ins.kv_bytes_per_token == {"bf16": 185.5 * 1024, "fp8": 92.75 * 1024}
    row11 = ins.layers[11]  # HF discussion #21: layer 11 is linear attention + FFN 14336
    assert (row11.attention, row11.kv_heads, row11.ffn, row11.width) == ("linear", None, "mlp", 14336)
    assert row11.params == 8192 * 8192 + 8192 + 3 * 8192 * 14336 + 8192
    text = format_inspection(ins)
    assert "attention 54 / linear 18 / no_op 8" in text
    assert "KV heads: 371 in total (44 x kv8, 1 x kv4, 6 x kv2, 3 x kv1)" in text
    assert "bf16 185.5 KiB, fp8 92.75 KiB" in text
    assert "parameters: 51,501,015,040" in text
    assert len([ln for ln in text.splitlines() if ln[:5].strip().isdigit()]) == 80


def test_cli_table_and_json(cfg51, capsys):
    assert main(["inspect", str(cfg51)]) == 0
    out = capsys.readouterr().out
    assert "   11  linear" in out and "KV heads: 371" in out
    assert main(["inspect", str(cfg51), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["attention_counts"] == {"attention": 54, "linear": 18, "no_op": 8}
    assert data["kv_heads_total"] == 371 and len(data["layers"]) == 80
    assert data["layers"][43] == {"layer": 43, "attention": "no_op", "kv_heads": None, "ffn": "mlp",
                                  "width": 7168, "params": 3 * 8192 * 7168 + 8192}
    assert data["kv_heads_histogram"] == {"8": 44, "4": 1, "2": 6, "1": 3}


def test_smollm2(smollm2):
    ins = inspect_model(smollm2)
    assert ins.params == 134_515_008 and ins.tie_word_embeddings
    assert ins.attention_counts["attention"] == 30 and ins.kv_heads_total == 90
    assert ins.kv_bytes_per_token["bf16"] == 30 * 3 * 2 * 64 * 2
    assert {r.width for r in ins.layers} == {1536}
    assert ins.rope_theta == 100000.0


def test_converted_checkpoint_matches_hf(synthetic, tmp_path):
    out = convert_checkpoint(synthetic, tmp_path / "ckpt", ConvertOptions("float16", 8, 2), progress=False)
    hf, trt = inspect_model(synthetic), inspect_model(out)
    assert trt.source == "trtllm-checkpoint" and (trt.tp_size, trt.pp_size) == (8, 2)
    assert trt.dtype == "float16" and trt.quant_algo is None
    assert trt.layers == hf.layers and trt.params == hf.params
    assert trt.attention_counts == {"attention": 5, "linear": 1, "no_op": 2}
    assert trt.ffn_counts == {"mlp": 5, "linear": 1, "no_op": 2}
    # kv 8, 4, 1, 2, 4 at tp 8: every layer holds ceil(kv/8) = 1 head per rank
    assert trt.kv_bytes_per_token["bf16_per_rank"] == 5 * 2 * 8 * 2
    assert trt.kv_bytes_per_token["bf16"] == 19 * 2 * 8 * 2
    assert "mapping: tp 8, pp 2" in format_inspection(trt)
    engine = tmp_path / "engine"
    engine.mkdir()
    cfg = json.loads((out / "config.json").read_text())
    (engine / "config.json").write_text(json.dumps({"pretrained_config": cfg, "build_config": {}}))
    eng = inspect_model(engine)
    assert eng.source == "trtllm-engine" and eng.layers == hf.layers and eng.tp_size == 8


def test_cli_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nasrt inspect: error: ") and "nope" in err and "not found" in err
