"""``nasrt check`` and the TensorRT-LLM 1.2 loading rules (issue 8, scopes 1 and 5).

The keyword lists below are transcribed from shared/reference/trtllm-checkpoint-format.md (the ``mapping`` section,
confirmed from ``tensorrt_llm/mapping.py`` of 1.2) independently of ``nasrt.deploy.check.trtllm_schema``; the
stand-in constructors accept exactly those keywords (TypeError otherwise, as 1.2's have no ``**kwargs``) and apply
Mapping's consistency checks. Every checkpoint nasrt writes must pass both ``nasrt check`` and the stand-ins.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nasrt.arch import from_hf_config, load_spec, read_json
from nasrt.cli import main
from nasrt.convert import ConvertOptions, convert_checkpoint
from nasrt.deploy.check import check_dir
from nasrt.deploy.check import trtllm_schema as S
from nasrt.fixtures import write_synthetic
from nasrt.quantize.calibrate import QuantSettings
from nasrt.quantize.export import export_trtllm, fp8_scales
from nasrt.st_io import SafetensorsReader
from nasrt.tensor_map import layer_rules

#: TensorRT-LLM 1.2 ``Mapping.__init__`` keywords (reference doc, mapping section).
MAPPING_KEYWORDS = {"world_size", "rank", "gpus_per_node", "cp_size", "cp_config", "tp_size", "pp_size",
                    "moe_cluster_size", "moe_tp_size", "moe_ep_size", "attn_tp_size", "attn_cp_size",
                    "enable_attention_dp", "enable_lm_head_tp_in_adp"}
#: TensorRT-LLM 1.2 ``QuantConfig`` fields (reference doc, mapping section).
QUANT_CONFIG_KEYWORDS = {"quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val",
                         "use_meta_recipe", "has_zero_point", "pre_quant_scale", "exclude_modules"}


def standin_mapping(**kw) -> None:
    """Accepts exactly 1.2's keywords; -1 / absent attention and MoE sizes are derived as 1.2 does."""
    unknown = set(kw) - MAPPING_KEYWORDS
    if unknown:
        raise TypeError(f"Mapping.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")
    tp, pp, cp = kw.get("tp_size", 1), kw.get("pp_size", 1), kw.get("cp_size", 1)
    if tp * pp * cp != kw.get("world_size", 1):
        raise ValueError("world_size must equal to tp_size * pp_size * cp_size")
    atp, acp = kw.get("attn_tp_size", -1), kw.get("attn_cp_size", -1)
    if atp == -1 and acp == -1:
        atp, acp = tp, cp
    elif atp == -1:
        atp = tp * cp // acp
    elif acp == -1:
        acp = tp * cp // atp
    if atp * acp != tp * cp:
        raise ValueError("tp_size * cp_size must equal to attn_tp_size * attn_cp_size")
    mtp, mep, mcl = kw.get("moe_tp_size", -1), kw.get("moe_ep_size", -1), kw.get("moe_cluster_size", -1)
    mcl = 1 if mcl == -1 else mcl
    if mtp == -1 and mep == -1:
        mtp, mep = tp // mcl, 1
    elif mtp == -1:
        mtp = tp // (mep * mcl)
    elif mep == -1:
        mep = tp // (mtp * mcl)
    if mtp * mep * mcl != tp:
        raise ValueError("moe_tp_size * moe_ep_size * moe_cluster_size must equal to moe_world_size")


def standin_quant_config(**kw) -> None:
    unknown = set(kw) - QUANT_CONFIG_KEYWORDS
    if unknown:
        raise TypeError(f"QuantConfig.__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")


def construct(cfg: dict) -> None:
    """What ``PretrainedConfig.from_dict`` does with the two sections."""
    standin_mapping(**cfg["mapping"])
    standin_quant_config(**cfg["quantization"])


def test_schema_tables_are_the_reference_lists():
    assert set(S.MAPPING_KEYWORDS) == MAPPING_KEYWORDS
    assert set(S.QUANT_CONFIG_KEYWORDS) == QUANT_CONFIG_KEYWORDS


def test_standins_reject_what_12_rejects():
    """The pre-fix mapping (auto_parallel, attn_tp_size 1) fails the stand-in exactly as 1.2 failed."""
    old = {"world_size": 2, "gpus_per_node": 8, "cp_size": 1, "tp_size": 2, "pp_size": 1, "moe_tp_size": 2,
           "moe_cluster_size": 1, "moe_ep_size": 1, "attn_tp_size": 1, "attn_cp_size": 1, "auto_parallel": False}
    with pytest.raises(TypeError, match="auto_parallel"):
        standin_mapping(**old)
    old.pop("auto_parallel")
    with pytest.raises(ValueError, match="attn_tp_size"):
        standin_mapping(**old)
    with pytest.raises(TypeError, match="producer"):
        standin_quant_config(quant_algo=None, producer="x")


# ---- every checkpoint nasrt writes ----------------------------------------------------------------------------
def synthetic_amax(reader, spec) -> dict:
    """An amax table like calibration's (weight abs-max, fixed input / K / V amax), without ModelOpt."""
    table: dict[str, dict[str, torch.Tensor]] = {}
    for i, layer in enumerate(spec.layers):
        for rule in layer_rules(layer):
            if rule.linear:
                for name in rule.hf_names(i):
                    table[name.rsplit(".weight", 1)[0]] = {"weight": reader.get(name).float().abs().max(),
                                                           "input": torch.tensor(3.0)}
        if layer.has_kv_cache:
            table[f"model.layers.{i}.self_attn"] = {"k": torch.tensor(600.0), "v": torch.tensor(300.0)}
    return table


_AMAX: dict[Path, dict] = {}


def write_fp8(hf: Path, out: Path, tp: int, pp: int) -> Path:
    """The TensorRT-LLM FP8 checkpoint ``nasrt quantize`` exports (same exporter), with synthetic amax values
    (computed once per model: they do not depend on the layout)."""
    spec = load_spec(hf)
    reader = SafetensorsReader(hf)
    settings = QuantSettings("fp8", "fp8")
    if hf not in _AMAX:
        _AMAX[hf] = synthetic_amax(reader, spec)
    scales = fp8_scales(_AMAX[hf], spec, settings)
    out.mkdir(parents=True)
    export_trtllm(reader, spec, ConvertOptions("bfloat16", tp, pp), "bfloat16", scales, settings, out, progress=False)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, synthetic, smollm2) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check_models")
    return {"all-variants": synthetic, "smollm2": smollm2,
            "51b-pattern": write_synthetic(root / "51b", "nemotron-51b-tiny", shards=1)}


LAYOUTS = [(tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2, 3)]
CASES = ([("all-variants", tp, pp) for tp, pp in LAYOUTS] + [("51b-pattern", tp, pp) for tp, pp in LAYOUTS]
         + [pytest.param("smollm2", 1, pp, marks=pytest.mark.slow)  # 9 heads: tp 2 / 4 / 8 cannot split them
            for pp in (1, 2, 3)])


@pytest.mark.parametrize("quant", ["bf16", "fp8"])
@pytest.mark.parametrize(("model", "tp", "pp"), CASES)
def test_every_written_checkpoint_passes_check_and_constructs(models, tmp_path, model, tp, pp, quant):
    hf = models[model]
    out = tmp_path / "ckpt"
    if quant == "bf16":  # convert runs nasrt check itself before the rename
        convert_checkpoint(hf, out, ConvertOptions("bfloat16", tp, pp), progress=False)
    else:
        write_fp8(hf, out, tp, pp)
    report = check_dir(out)
    assert report.target == "checkpoint" and report.ok, [p.line() for p in report.problems]
    cfg = read_json(out / "config.json")
    construct(cfg)
    assert cfg["mapping"]["world_size"] == tp * pp == len(list(out.glob("rank*.safetensors")))
    if quant == "fp8":
        q = cfg["quantization"]
        assert (q["quant_algo"], q["kv_cache_quant_algo"]) == ("FP8", "FP8")
        rank0 = load_file(str(out / "rank0.safetensors"))
        assert any(n.endswith("weights_scaling_factor") for n in rank0)
        assert any(t.dtype == torch.float8_e4m3fn for t in rank0.values())


def test_top_level_fallbacks_as_trtllm_writes_them(models):
    """51B pattern: PretrainedConfig defaults (nh, 4H) as TensorRT-LLM writes; Llama (SmolLM2): HF's own values."""
    spec = load_spec(models["51b-pattern"])
    cfg = spec.to_trtllm_config("bfloat16", {"world_size": 1, "tp_size": 1, "pp_size": 1})
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"]) == (64, 4 * 128)
    hf = read_json(models["smollm2"] / "config.json")
    cfg = from_hf_config(hf).to_trtllm_config("bfloat16", {"world_size": 1})
    assert (cfg["num_key_value_heads"], cfg["intermediate_size"]) == (hf["num_key_value_heads"], hf["intermediate_size"])
    # the per-layer values stay explicit: the fallbacks are never used for a layer
    assert all(lc["attention"]["num_key_value_heads"] for lc in cfg["layer_configs"])


@pytest.mark.slow
def test_real_quantize_output_passes_check(models, tmp_path):
    """``nasrt quantize`` itself (ModelOpt calibration, tp 2 x pp 2) writes a checkpoint that passes."""
    from nasrt.quantize import QuantizeOptions, quantize_checkpoint
    from nasrt.quantize.tiny_tokenizer import write_tiny_tokenizer

    hf = tmp_path / "hf"
    shutil.copytree(models["all-variants"], hf)
    write_tiny_tokenizer(hf, load_spec(hf).vocab_size)
    opts = QuantizeOptions(dtype="bfloat16", kv_cache_dtype="fp8", calib_size=2, calib_max_seq_length=16,
                           tp_size=2, pp_size=2)
    out = quantize_checkpoint(hf, tmp_path / "fp8", opts, progress=False).output_dir
    report = check_dir(out)
    assert report.ok, [p.line() for p in report.problems]
    construct(read_json(out / "config.json"))


# ---- planted defects, each caught by name ------------------------------------------------------------------
@pytest.fixture(scope="module")
def good(tmp_path_factory, synthetic) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("check_good")
    return {"bf16": convert_checkpoint(synthetic, root / "bf16", ConvertOptions("bfloat16", 2, 2), progress=False),
            "fp8": write_fp8(synthetic, root / "fp8", 2, 1)}


def planted(good: dict[str, Path], tmp_path: Path, which: str = "bf16") -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(good[which], dst)
    return dst


def edit_config(ckpt: Path, fn) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    fn(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def edit_rank(ckpt: Path, rank: int, fn) -> None:
    path = ckpt / f"rank{rank}.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def problems(ckpt: Path, capsys) -> list[str]:
    rc = main(["check", str(ckpt)])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("nasrt check: error:")]
    assert rc == 2 and lines
    return lines


def assert_named(lines: list[str], name: str, *words: str) -> None:
    hits = [ln for ln in lines if f": {name}: " in ln]
    assert hits, f"{name} not reported in {lines}"
    for w in words:
        assert any(w in h for h in hits), (w, hits)


def test_good_checkpoint_exit_0(good, capsys):
    assert main(["check", str(good["bf16"])]) == 0
    assert "checkpoint OK" in capsys.readouterr().out


def test_auto_parallel_in_mapping(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path)
    edit_config(ckpt, lambda c: c["mapping"].update(auto_parallel=False))
    assert_named(problems(ckpt, capsys), "mapping.auto_parallel", "Mapping.__init__")


def test_attn_tp_size_differs_from_tp_size(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path)
    edit_config(ckpt, lambda c: c["mapping"].update(attn_tp_size=1, attn_cp_size=1))
    assert_named(problems(ckpt, capsys), "mapping.attn_tp_size", "attn_tp_size 1", "tp_size 2")


def test_unknown_quantization_key(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path)
    edit_config(ckpt, lambda c: c["quantization"].update(producer="modelopt"))
    assert_named(problems(ckpt, capsys), "quantization.producer", "QuantConfig")


def test_layer_configs_length(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path)
    edit_config(ckpt, lambda c: c["layer_configs"].pop())
    assert_named(problems(ckpt, capsys), "layer_configs", "7 entries", "num_hidden_layers 8")


def test_missing_tensor_on_one_rank(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path)
    edit_rank(ckpt, 1, lambda t: t.pop("transformer.layers.0.attention.dense.weight"))
    lines = problems(ckpt, capsys)
    assert_named(lines, "transformer.layers.0.attention.dense.weight", "missing")
    assert all("rank1.safetensors" in ln for ln in lines)


def test_extra_tensor_on_one_rank(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path)
    edit_rank(ckpt, 0, lambda t: t.update({"transformer.layers.3.attention.qkv.weight": torch.zeros(2, 2)}))
    assert_named(problems(ckpt, capsys), "transformer.layers.3.attention.qkv.weight", "unexpected")


def test_wrong_shape_tensor(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path)
    name = "transformer.layers.1.ffn.fc.weight"
    edit_rank(ckpt, 1, lambda t: t.update({name: t[name][:-1].clone()}))
    assert_named(problems(ckpt, capsys), name, "shape", "declares")


def test_wrong_dtype_tensor(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path)
    name = "transformer.ln_f.weight"
    edit_rank(ckpt, 3, lambda t: t.update({name: t[name].float()}))
    assert_named(problems(ckpt, capsys), name, "dtype F32", "expected BF16")


def test_fp8_weight_without_its_scale(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path, "fp8")
    name = "transformer.layers.2.ffn.proj.weights_scaling_factor"
    edit_rank(ckpt, 1, lambda t: t.pop(name))
    assert_named(problems(ckpt, capsys), name, "missing FP8 scale")


def test_missing_kv_scale(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path, "fp8")
    name = "transformer.layers.5.attention.kv_cache_scaling_factor"
    edit_rank(ckpt, 0, lambda t: t.pop(name))
    assert_named(problems(ckpt, capsys), name, "missing KV cache scale")


def test_kv_scale_on_a_layer_without_kv_cache(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path, "fp8")
    name = "transformer.layers.3.attention.kv_cache_scaling_factor"  # layer 3 is linear attention
    edit_rank(ckpt, 0, lambda t: t.update({name: torch.ones(1)}))
    assert_named(problems(ckpt, capsys), name, "unexpected")


def test_excluded_module_must_stay_unquantized(good, tmp_path, capsys):
    """exclude_modules are fnmatch patterns on module names: excluding the FFNs makes their FP8 weights wrong."""
    ckpt = planted(good, tmp_path, "fp8")
    edit_config(ckpt, lambda c: c["quantization"].update(exclude_modules=["lm_head", "*.ffn.*"]))
    lines = problems(ckpt, capsys)
    assert_named(lines, "transformer.layers.1.ffn.fc.weight", "dtype F8_E4M3", "expected BF16")
    assert_named(lines, "transformer.layers.1.ffn.fc.weights_scaling_factor", "unexpected")
    assert not any(".attention." in ln for ln in lines)


def test_modelopt_spellings_are_accepted(good, tmp_path):
    """``.mlp.`` / ``.attn_replacing_linear.`` load as ``.ffn.`` / ``.attention.`` (from_checkpoint's renames)."""
    ckpt = planted(good, tmp_path, "fp8")
    for rank in (0, 1):
        edit_rank(ckpt, rank, lambda t: t.update({k.replace(".ffn.", ".mlp."): t.pop(k) for k in list(t)
                                                  if ".ffn.fc." in k}))
    report = check_dir(ckpt)
    assert report.ok, [p.line() for p in report.problems]


def test_json_report(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path)
    edit_config(ckpt, lambda c: c["mapping"].update(auto_parallel=False, world_size=3))
    assert main(["check", str(ckpt), "--json"]) == 2
    data = json.loads(capsys.readouterr().out)
    assert data["target"] == "checkpoint" and data["ok"] is False
    assert {p["what"] for p in data["problems"]} == {"mapping.auto_parallel", "mapping.world_size"}


def test_rank_file_missing_and_stray(good, tmp_path, capsys):
    ckpt = planted(good, tmp_path)
    (ckpt / "rank3.safetensors").rename(ckpt / "rank4.safetensors")
    lines = problems(ckpt, capsys)
    assert_named(lines, "rank3.safetensors", "missing")
    assert_named(lines, "rank4.safetensors", "beyond")


def test_check_reads_headers_only(good, tmp_path, monkeypatch):
    """No tensor bytes are read: the tensor getters are never called."""
    import nasrt.st_io

    for method in ("get", "read"):
        monkeypatch.setattr(nasrt.st_io.SafetensorsReader, method,
                            lambda *a, **k: (_ for _ in ()).throw(AssertionError("tensor data read")))
    assert check_dir(good["fp8"]).ok


def test_not_a_checkpoint(synthetic, capsys):
    assert main(["check", str(synthetic)]) == 2
    err = capsys.readouterr().err
    assert "nasrt check: error:" in err and "nasrt convert" in err


# ---- Triton repositories written by hand (upstream-template style) --------------------------------------------
TEMPLATE = '''name: "tensorrt_llm"
backend: "tensorrtllm"
max_batch_size: ${triton_max_batch_size}
model_transaction_policy { decoupled: ${decoupled_mode} }
input [ { name: "input_ids" data_type: TYPE_INT32 dims: [ -1 ] allow_ragged_batch: true } ]
output [ { name: "output_ids" data_type: TYPE_INT32 dims: [ -1, -1 ] } ]
parameters: { key: "gpt_model_type" value: { string_value: "inflight_fused_batching" } }
parameters: { key: "gpt_model_path" value: { string_value: "${engine_dir}" } }
parameters: { key: "worker_path" value: { string_value: "/opt/worker" } }
parameters: { key: "enable_kv_cache_reuse" value: { string_value: "yes" } }
'''


def test_upstream_style_template_problems(tmp_path, capsys):
    (tmp_path / "repo" / "tensorrt_llm").mkdir(parents=True)
    (tmp_path / "repo" / "tensorrt_llm" / "config.pbtxt").write_text(TEMPLATE)
    assert main(["check", str(tmp_path / "repo"), "--json"]) == 2
    found = {p["what"]: p["message"] for p in json.loads(capsys.readouterr().out)["problems"]}
    assert "unfilled placeholder ${engine_dir}" in found["parameters.gpt_model_path"]
    assert "${triton_max_batch_size}" in found["line 3"] and "${decoupled_mode}" in found["line 4"]
    for key in ("tokenizer_dir", "guided_decoding_backend", "xgrammar_tokenizer_info_path"):
        assert "Cannot find parameter with name" in found[f"parameters.{key}"]
    assert "no longer supported" in found["parameters.worker_path"]
    assert "boolean" in found["parameters.enable_kv_cache_reuse"]


def test_textproto_reader_matches_triton_protobuf(tmp_path):
    """The metadata reader agrees with Triton's own ModelConfig protobuf on a generated config."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from nasrt.deploy.check.textproto import first, parameters, parse
    from nasrt.deploy.triton import signatures as sig
    from nasrt.deploy.triton.pbtxt import ModelConfig

    text = ModelConfig("ensemble", 4, sig.ENSEMBLE_INPUTS, sig.ENSEMBLE_OUTPUTS, platform="ensemble",
                       steps=sig.ENSEMBLE_STEPS, parameters={"a": 'x "q" \\\\ y'}).render()
    pb = text_format.Parse(text, model_config_pb2.ModelConfig())
    msg = parse(text)
    assert first(msg, "platform") == pb.platform and int(first(msg, "max_batch_size")) == pb.max_batch_size
    assert [first(t, "name") for t in msg["input"]] == [t.name for t in pb.input]
    assert parameters(msg) == {k: v.string_value for k, v in pb.parameters.items()}
    steps = first(msg, "ensemble_scheduling")["step"]
    assert [first(s, "model_name") for s in steps] == [s.model_name for s in pb.ensemble_scheduling.step]


def test_convert_checks_its_output_before_the_rename(synthetic, tmp_path, monkeypatch):
    """A writer regression (here: the pre-fix mapping) is caught by convert itself; nothing lands under the name."""
    import nasrt.sharding
    from nasrt.errors import CheckpointError

    real = nasrt.sharding.Mapping.to_dict
    monkeypatch.setattr(nasrt.sharding.Mapping, "to_dict", lambda self: {**real(self), "auto_parallel": False})
    out = tmp_path / "ckpt"
    with pytest.raises(CheckpointError, match=r"mapping\.auto_parallel"):
        convert_checkpoint(synthetic, out, ConvertOptions("bfloat16", 2), progress=False)
    assert list(tmp_path.iterdir()) == []
