"""The per-layer architecture model: HF parsing (nemotron-nas, deci, llama), formulas, refusals, round trips."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest

from nasrt.arch import (
    AttnKind,
    FfnKind,
    Llama3Rope,
    ModelSpec,
    ffn_mult_to_intermediate_size,
    from_hf_config,
    from_trtllm_config,
    load_spec,
)
from nasrt.convert import ConvertOptions, trtllm_config
from nasrt.errors import ConfigError
from nasrt.fixtures import write_config_only
from nasrt.presets import ALL_VARIANTS_PATTERN, hf_config, released_config
from nasrt.sharding import Mapping


def all_variants_cfg(**kw) -> dict:
    return hf_config(ALL_VARIANTS_PATTERN, hidden_size=64, num_attention_heads=8, vocab_size=1003, **kw)


def llama_cfg(**kw) -> dict:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 576,
           "num_attention_heads": 9, "num_key_value_heads": 3, "num_hidden_layers": 30, "intermediate_size": 1536,
           "vocab_size": 49152, "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
           "tie_word_embeddings": True, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
           "dtype": "float32"}
    cfg.update(kw)
    return cfg


# ---- parsing ------------------------------------------------------------------------------------------------

def test_nemotron_nas_all_variants():
    spec = from_hf_config(all_variants_cfg())
    kinds = [(la.attention.kind.value, la.attention.num_kv_heads, la.ffn.kind.value, la.ffn.intermediate_size)
             for la in spec.layers]
    # pattern 0:g1/1.0 1:g2/7.0 2:g8/3.0 3:L/1.0 4:N/5.0 5:g4/L 6:g2/N 7:N/N at H 64, 8 heads
    assert kinds == [("attention", 8, "mlp", 256), ("attention", 4, "mlp", 512), ("attention", 1, "mlp", 256),
                     ("linear", None, "mlp", 256), ("no_op", None, "mlp", 256), ("attention", 2, "linear", None),
                     ("attention", 4, "no_op", None), ("no_op", None, "no_op", None)]
    assert spec.kv_heads_per_layer == [8, 4, 1, 2, 4]
    assert spec.layer_types == ["attention"] * 3 + ["linear", "no_op", "attention", "attention", "no_op"]
    assert spec.head_dim == 8 and spec.vocab_size == 1003 and not spec.tie_word_embeddings
    assert spec.rope_theta == 500000.0 and spec.torch_dtype == "bfloat16"


def test_deci_7b_style():
    cfg = {"model_type": "deci", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 4,
           "num_key_value_heads_per_layer": [4, 2, 1, 4], "intermediate_size": 14336, "vocab_size": 32000,
           "rope_theta": 10000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}}
    with pytest.raises(ConfigError, match=r"rope scaling type 'dynamic'"):
        from_hf_config(cfg)
    del cfg["rope_scaling"]
    spec = from_hf_config(cfg)
    assert spec.kv_heads_per_layer == [4, 2, 1, 4]
    assert all(la.ffn.kind is FfnKind.MLP and la.ffn.intermediate_size == 14336 for la in spec.layers)
    cfg["num_key_value_heads_per_layer"] = [4, 2, 1]
    with pytest.raises(ConfigError, match=r"3 num_key_value_heads_per_layer for 4 layers"):
        from_hf_config(cfg)


def test_plain_llama():
    spec = from_hf_config(llama_cfg())
    assert spec.num_layers == 30 and spec.kv_heads_per_layer == [3] * 30
    assert {la.ffn.intermediate_size for la in spec.layers} == {1536}
    assert spec.tie_word_embeddings and spec.rope_theta == 100000.0 and spec.rope_scaling is None
    assert spec.torch_dtype == "float32"
    # SmolLM2-135M-Instruct: 134,515,008 parameters (tied embedding counted once)
    assert spec.num_params == 134_515_008
    no_kv = llama_cfg(num_key_value_heads=None)
    assert from_hf_config(no_kv).kv_heads_per_layer == [9] * 30  # MHA fallback


def test_smollm2_fixture_config(smollm2):
    spec = load_spec(smollm2)
    assert (spec.hidden_size, spec.num_attention_heads, spec.kv_heads_per_layer[0], spec.vocab_size) == \
        (576, 9, 3, 49152)
    assert spec.num_params == 134_515_008 and spec.tie_word_embeddings and spec.rope_theta == 100000.0


@pytest.mark.parametrize(("mult", "hidden", "width"), [
    (0.5, 8192, 2816), (1.0, 8192, 5632), (1.3125, 8192, 7168), (2.625, 8192, 14336), (3.28125, 8192, 17920),
    (5.25, 8192, 28672), (0.5, 4096, 1536), (1.0, 4096, 2816), (1.3125, 4096, 3584), (2.625, 4096, 7168),
    (3.28125, 4096, 8960), (5.25, 4096, 14336), (0.4875, 16384, 5376), (0.975, 16384, 10752),
    (1.4625, 16384, 16128), (1.95, 16384, 21504), (2.4375, 16384, 26624), (2.925, 16384, 32000),
    (3.4125, 16384, 37376), (4.875, 16384, 53248), (27.5625, 16384, 301056), (31.40625, 16384, 343040),
    (36.5625, 16384, 399360), (39.0, 16384, 425984),
])
def test_intermediate_size_table(mult, hidden, width):
    assert ffn_mult_to_intermediate_size(mult, hidden) == width


def test_rope_theta_top_level_and_rope_parameters():
    top = llama_cfg(rope_theta=250000.0)
    del top["rope_parameters"]
    assert from_hf_config(top).rope_theta == 250000.0
    assert from_hf_config(llama_cfg()).rope_theta == 100000.0  # transformers 5: only rope_parameters
    neither = llama_cfg()
    del neither["rope_parameters"]
    assert from_hf_config(neither).rope_theta == 10000.0
    null_top = llama_cfg(rope_theta=None)  # a null top-level key must not hide rope_parameters
    assert from_hf_config(null_top).rope_theta == 100000.0


def test_llama3_rope_scaling_both_forms():
    want = Llama3Rope(8.0, 1.0, 4.0, 8192)
    old = released_config("nemotron-51b")
    spec = from_hf_config(old)
    assert spec.rope_theta == 500000.0 and spec.rope_scaling == want
    new = copy.deepcopy(old)  # transformers 5 form: everything inside rope_parameters
    new["rope_parameters"] = {"rope_theta": new.pop("rope_theta"), **new.pop("rope_scaling")}
    spec5 = from_hf_config(new)
    assert spec5.rope_theta == 500000.0 and spec5.rope_scaling == want
    bad = copy.deepcopy(old)
    del bad["rope_scaling"]["low_freq_factor"]
    with pytest.raises(ConfigError, match=r"low_freq_factor"):
        from_hf_config(bad)
    yarn = copy.deepcopy(old)
    yarn["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match=r"'yarn'"):
        from_hf_config(yarn)


# ---- refusals -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("layer", "sub", "field", "value"), [
    (2, "attention", "sparsify", ["q_proj"]),
    (2, "ffn", "sparsify", ["gate_proj"]),
    (1, "attention", "window_length", 4096),
    (6, "attention", "num_sink_tokens", 4),
    (6, "attention", "unshifted_sink", True),
    (6, "attention", "use_prefill_window_in_sink_attention", True),
    (0, "attention", "mamba", {"state_dim": 128}),
    (0, "attention", "llama4", {"rope": True}),
    (4, "ffn", "moe", {"num_experts": 8}),
    (4, "ffn", "intermediate_size", 4096),
])
def test_unsupported_block_fields_name_the_layer(layer, sub, field, value):
    cfg = all_variants_cfg()
    cfg["block_configs"][layer][sub][field] = value
    with pytest.raises(ConfigError, match=rf"^layer {layer} {sub}: .*{field}"):
        from_hf_config(cfg)


def test_null_optional_fields_accepted():
    cfg = all_variants_cfg()
    for b in cfg["block_configs"]:  # Super/Ultra carry these keys with null/false values
        b["attention"].update(window_length=None, num_sink_tokens=None, unshifted_sink=False,
                              use_prefill_window_in_sink_attention=False)
    assert from_hf_config(cfg) == from_hf_config(all_variants_cfg())


@pytest.mark.parametrize(("mutate", "pattern"), [
    (lambda c: c["block_configs"][3]["attention"].update(no_op=True), r"layer 3 attention: no_op and replace"),
    (lambda c: c["block_configs"][0]["attention"].update(n_heads_in_group=3), r"layer 0 attention: n_heads_in_group=3"),
    (lambda c: c["block_configs"][0]["attention"].update(n_heads_in_group=None), r"layer 0 attention"),
    (lambda c: c["block_configs"][1]["ffn"].update(ffn_mult=None), r"layer 1 ffn: ffn_mult=None"),
    (lambda c: c["block_configs"].pop(), r"7 block_configs for num_hidden_layers=8"),
    (lambda c: c["block_configs"].__setitem__(2, {"attention": {}}), r"layer 2: block config needs"),
    (lambda c: c.update(hidden_act="gelu"), r"hidden_act 'gelu'"),
    (lambda c: c.update(attention_bias=True), r"attention_bias"),
    (lambda c: c.update(num_attention_heads=7), r"not divisible by num_attention_heads 7"),
    (lambda c: c.pop("vocab_size"), r"'vocab_size'"),
])
def test_bad_hf_configs(mutate, pattern):
    cfg = all_variants_cfg()
    mutate(cfg)
    with pytest.raises(ConfigError, match=pattern):
        from_hf_config(cfg)


def test_unknown_model_type():
    with pytest.raises(ConfigError, match=r"model_type 'gpt2' is not supported"):
        from_hf_config({"model_type": "gpt2", "hidden_size": 64, "num_attention_heads": 8, "num_hidden_layers": 2,
                        "vocab_size": 10})


# ---- released models ----------------------------------------------------------------------------------------

def test_nemotron_51b_counts(tmp_path):
    spec = load_spec(write_config_only("nemotron-51b", tmp_path / "51b"))
    kinds = Counter(la.attention.kind for la in spec.layers)
    assert (kinds[AttnKind.ATTENTION], kinds[AttnKind.LINEAR], kinds[AttnKind.NO_OP]) == (54, 18, 8)
    assert Counter(spec.kv_heads_per_layer) == {8: 44, 4: 1, 2: 6, 1: 3}
    assert sum(spec.kv_heads_per_layer) == 371
    assert Counter(la.ffn.intermediate_size for la in spec.layers) == {28672: 44, 14336: 16, 7168: 20}
    assert spec.num_params == pytest.approx(51.50e9, rel=5e-4)
    assert spec.kv_bytes_per_token(2) == 185.5 * 1024 and spec.kv_bytes_per_token(1) == 92.75 * 1024
    # per-rank KV heads under TP (K/V duplicated when tp > kv)
    assert [spec.kv_bytes_per_token(1, tp) / (2 * 128) for tp in (1, 2, 4, 8)] == [371, 187, 98, 54]


@pytest.mark.parametrize(("name", "params", "kv_sum", "attn", "no_op"), [
    ("super-49b", 49.87e9, 392, 49, 31),
    ("ultra-253b", 253.40e9, 512, 64, 98),
])
def test_other_released_models(tmp_path, name, params, kv_sum, attn, no_op):
    spec = load_spec(write_config_only(name, tmp_path / name))
    assert spec.num_params == pytest.approx(params, rel=5e-4)
    assert sum(spec.kv_heads_per_layer) == kv_sum
    kinds = Counter(la.attention.kind for la in spec.layers)
    assert (kinds[AttnKind.ATTENTION], kinds[AttnKind.NO_OP], kinds[AttnKind.LINEAR]) == (attn, no_op, 0)


# ---- TensorRT-LLM config round trip -------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    released_config("nemotron-51b"), released_config("ultra-253b"), all_variants_cfg(), llama_cfg(),
], ids=["51b", "253b", "all-variants", "llama"])
@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (4, 2)])
def test_trtllm_config_round_trip(cfg, tp, pp):
    spec = from_hf_config(cfg)
    tcfg = spec.to_trtllm_config("bfloat16", Mapping(tp, pp).to_dict())
    back = from_trtllm_config(json.loads(json.dumps(tcfg)))
    assert back == spec.__class__(**{**spec.__dict__, "torch_dtype": "bfloat16"})
    assert back.layers == spec.layers and back.num_params == spec.num_params
    assert tcfg["layer_types"] == spec.layer_types and tcfg["num_kv_heads_per_layer"] == spec.kv_heads_per_layer


def test_load_spec_forms(tmp_path):
    spec = from_hf_config(all_variants_cfg())
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(all_variants_cfg()))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    tcfg = trtllm_config(spec, ConvertOptions(tp_size=2), "bfloat16")
    (ckpt / "config.json").write_text(json.dumps(tcfg))
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "config.json").write_text(json.dumps({"version": "1.2.1", "pretrained_config": tcfg,
                                                    "build_config": {}}))
    for d in (hf_dir, ckpt, engine, hf_dir / "config.json"):
        assert load_spec(d).layers == spec.layers, d
    with pytest.raises(ConfigError, match=r"missing.*file not found"):
        load_spec(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"bad\.json: invalid JSON"):
        load_spec(tmp_path / "bad.json")


def test_trtllm_config_refusals():
    tcfg = from_hf_config(all_variants_cfg()).to_trtllm_config("bfloat16", Mapping().to_dict())
    broken = copy.deepcopy(tcfg)
    broken["layer_configs"][3]["attention"]["impl"] = "mamba"
    with pytest.raises(ConfigError, match=r"layer_configs\[3\]"):
        from_trtllm_config(broken)
    short = copy.deepcopy(tcfg)
    short["layer_configs"].pop()
    with pytest.raises(ConfigError, match=r"7 layer configs for num_hidden_layers=8"):
        from_trtllm_config(short)


def test_spec_is_frozen():
    spec = from_hf_config(all_variants_cfg())
    assert isinstance(spec, ModelSpec)
    with pytest.raises(AttributeError):
        spec.hidden_size = 1  # type: ignore[misc]
