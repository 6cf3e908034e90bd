"""FP8 with ModelOpt (issue 4): layer-wise calibration equals whole-model ModelOpt, the TensorRT-LLM checkpoint
equals ModelOpt's own export, FP8 quality on SmolLM2, every DeciLM variant at tp 1/2/4, the unified HF export,
and bad input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nasrt.arch import AttnKind, FfnKind, load_spec, read_json
from nasrt.cli import main
from nasrt.convert import ConvertOptions, convert_checkpoint
from nasrt.errors import ConfigError, MissingDependencyError, NasrtError
from nasrt.fixtures import write_synthetic
from nasrt.fp8 import FP8_DTYPE, FP8_MAX, dequantize
from nasrt.quantize import QuantizeOptions, quantize_checkpoint
from nasrt.quantize.calib_data import load_calibration_texts
from nasrt.quantize.calibrate import QuantSettings
from nasrt.quantize.pipeline import calibration_batches
from nasrt.quantize.tiny_tokenizer import write_tiny_tokenizer
from nasrt.st_io import SafetensorsReader
from nasrt.tensor_map import ACT_SCALE, FP8_FUSED_GROUPS, KV_SCALE, WEIGHT_SCALE, layer_rules, lm_head_rule
from nasrt.textdata import eval_text
from nasrt.trtllm_ckpt import load_checkpoint

# recipe "max" = ModelOpt's default arithmetic, which these tests compare against (the searched recipes:
# tests/test_fp8_quality.py); the held-out evaluation is tested there too.
SMOL_OPTS = QuantizeOptions(dtype="bfloat16", kv_cache_dtype="fp8", calib_size=8, calib_max_seq_length=64,
                            batch_size=4, recipe="max", skip_eval=True)
SYN_OPTS = QuantizeOptions(dtype="bfloat16", kv_cache_dtype="fp8", calib_size=6, calib_max_seq_length=48,
                           batch_size=2, recipe="max", skip_eval=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def _within_fp8_rounding(deq: torch.Tensor, orig: torch.Tensor, scale: torch.Tensor) -> bool:
    """E4M3 has 3 mantissa bits: relative error <= 2^-4 for normals, absolute <= scale * 2^-10 for subnormals."""
    orig = orig.float()
    tol = orig.abs() * 2.0 ** -4 + float(scale) * 2.0 ** -10 + 1e-12
    return bool(((deq.float() - orig).abs() <= tol).all())


# ---- SmolLM2: layer-wise == whole-model ModelOpt == ModelOpt's TensorRT-LLM export --------------------------

@pytest.fixture(scope="module")
def smol(smollm2, tmp_path_factory):
    """nasrt's layer-wise FP8 checkpoint and ModelOpt's whole-model quantization + TRT-LLM export, same data."""
    from modelopt.torch.export import export_tensorrt_llm_checkpoint

    from nasrt.quantize.whole import calibrate_whole

    out = tmp_path_factory.mktemp("smol_fp8")
    res = quantize_checkpoint(smollm2, out / "nasrt", SMOL_OPTS, progress=False)
    spec = load_spec(smollm2)
    batches = calibration_batches(smollm2, spec, SMOL_OPTS)
    whole, model = calibrate_whole(smollm2, SafetensorsReader(smollm2), spec, batches,
                                   QuantSettings(kv_cache_dtype="fp8"), torch.float32)
    # transformers 5 keeps rope theta in rope_parameters; ModelOpt's export looks for config.rope_theta.
    model.config.rope_theta = model.config.rope_parameters["rope_theta"]
    export_tensorrt_llm_checkpoint(model, decoder_type="llama", dtype=torch.bfloat16,
                                   export_dir=str(out / "modelopt"), inference_tensor_parallel=1)
    return {"dir": out, "layerwise": res.amax, "whole": whole, "spec": spec, "modelopt_model": model}


def test_layerwise_scales_equal_whole_model(smol):
    spec, lw, wh = smol["spec"], smol["layerwise"], smol["whole"]
    linears = sum(len(r.hf) for la in spec.layers for r in layer_rules(la) if r.linear)
    attn = sum(la.has_kv_cache for la in spec.layers)
    assert len(wh) == linears + attn and set(lw) == set(wh)
    for module, amaxes in wh.items():
        want = {"weight", "input"} if module.endswith("_proj") else {"k", "v"}
        assert set(amaxes) == want and set(lw[module]) == want, module
        for kind, a in amaxes.items():
            assert float(a) > 0
            assert abs(float(lw[module][kind]) - float(a)) <= 1e-6 * abs(float(a)), (module, kind)


def test_trtllm_checkpoint_equals_modelopt_export(smol):
    ours = load_checkpoint(smol["dir"] / "nasrt")
    theirs = load_file(str(smol["dir"] / "modelopt" / "rank0.safetensors"))
    compared = 0
    for name, t in theirs.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("k_cache_scaling_factor", "v_cache_scaling_factor"):
            continue  # ModelOpt also keeps the unmerged pair; TensorRT-LLM reads kv_cache_scaling_factor
        mine = ours.tensors[name.replace(".mlp.", ".ffn.")]
        assert (mine.dtype, tuple(mine.shape)) == (t.dtype, tuple(t.shape)), name
        assert torch.equal(_bits(mine), _bits(t)), name
        compared += 1
    assert compared == len(ours.tensors)
    assert sum(t.dtype == FP8_DTYPE for t in ours.tensors.values()) == 5 * smol["spec"].num_layers  # qkv fused
    q_mo = read_json(smol["dir"] / "modelopt" / "config.json")["quantization"]
    for key in ("quant_algo", "kv_cache_quant_algo", "exclude_modules"):
        assert ours.config["quantization"][key] == q_mo[key], key
    assert ours.config["rotary_base"] == smol["spec"].rope_theta == 100000.0


@pytest.fixture(scope="module")
def smol_runtime(smollm2, smol, tmp_path_factory):
    from nasrt.runtime import load_model
    from nasrt.runtime.text import load_tokenizer

    bf16 = convert_checkpoint(smollm2, tmp_path_factory.mktemp("smol_bf16") / "ckpt", ConvertOptions("bfloat16"),
                              progress=False)
    return load_model(bf16), load_model(smol["dir"] / "nasrt"), load_tokenizer(smollm2)


class _HFScorer:
    """The interface :func:`nasrt.eval.perplexity` needs, over ModelOpt's fake-quantized transformers model."""

    def __init__(self, model, spec):
        self.model, self.spec, self.vocab_size = model, spec, spec.vocab_size

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits.float()


EVAL_CHARS, EVAL_SEQ = 2500, 256


@pytest.fixture(scope="module")
def smol_ppl(smol, smol_runtime):
    from nasrt.eval import perplexity

    bf16, fp8, tok = smol_runtime
    text = eval_text(EVAL_CHARS)
    ppl = {"bf16": perplexity(bf16, tok, text, max_seq_len=EVAL_SEQ, progress=False),
           "fp8": perplexity(fp8, tok, text, max_seq_len=EVAL_SEQ, progress=False),
           "modelopt": perplexity(_HFScorer(smol["modelopt_model"], smol["spec"]), tok, text, max_seq_len=EVAL_SEQ,
                                  progress=False)}
    print("perplexity " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    return ppl


def test_fp8_checkpoint_perplexity_matches_modelopt_fake_quant(smol_ppl):
    """The FP8 checkpoint, run by the reference runtime, scores what ModelOpt's own fake-quantized model scores:
    export + runtime add nothing measurable to the cost of quantization itself."""
    assert smol_ppl["fp8"] != smol_ppl["bf16"]  # FP8 really ran
    assert abs(smol_ppl["fp8"] / smol_ppl["modelopt"] - 1) <= 0.03, smol_ppl


@pytest.mark.xfail(strict=True, reason="ModelOpt's default recipe ('max', measured here) misses the 3% target: "
                   "FP8 W+A+KV costs ~5-6% on this Q4_1-derived SmolLM2 fixture (ModelOpt's own fake-quant model "
                   "too); nasrt's default recipe: bench/fp8_quality.py")
def test_fp8_perplexity_within_3_percent_of_bf16(smol_ppl):
    assert smol_ppl["fp8"] <= 1.03 * smol_ppl["bf16"], smol_ppl


def test_fp8_chat_answer_says_paris(smol_runtime):
    from nasrt.runtime import SamplingConfig, generate
    from nasrt.runtime.text import decode, encode_prompts

    _, fp8, tok = smol_runtime
    ids = encode_prompts(tok, ["What is the capital of France?"], chat=True)
    out = generate(fp8, ids, SamplingConfig(max_new_tokens=12))
    assert "Paris" in decode(tok, out[0])


# ---- synthetic DeciLM with every variant --------------------------------------------------------------------

@pytest.fixture(scope="module")
def syn(synthetic, tmp_path_factory) -> Path:
    """The all-variants model with a small tokenizer (calibration needs one)."""
    d = tmp_path_factory.mktemp("syn_q") / "hf"
    shutil.copytree(synthetic, d)
    write_tiny_tokenizer(d, load_spec(d).vocab_size)
    return d


@pytest.fixture(scope="module")
def syn_fp8(syn, tmp_path_factory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("syn_fp8")
    return {tp: quantize_checkpoint(syn, out / f"tp{tp}", QuantizeOptions(**{**SYN_OPTS.__dict__, "tp_size": tp}),
                                    progress=False).output_dir
            for tp in (1, 2, 4)}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_synthetic_every_linear_fp8(tp, syn, syn_fp8):
    spec = load_spec(syn)
    src = SafetensorsReader(syn)
    ck = load_checkpoint(syn_fp8[tp])
    assert ck.config["mapping"]["tp_size"] == tp and len(list(syn_fp8[tp].glob("rank*.safetensors"))) == tp
    q = ck.config["quantization"]
    assert q["quant_algo"] == "FP8" and q["kv_cache_quant_algo"] == "FP8" and "lm_head" in q["exclude_modules"]
    assert ck.config["rotary_base"] == spec.rope_theta
    seen = set()
    for i, layer in enumerate(spec.layers):
        prefix = f"transformer.layers.{i}."
        linears = {r.linear: r for r in layer_rules(layer) if r.linear}
        want = ({"attention.qkv", "attention.dense"} if layer.attention.kind is AttnKind.ATTENTION else
                {"attention"} if layer.attention.kind is AttnKind.LINEAR else set())
        want |= ({"ffn.fc", "ffn.gate", "ffn.proj"} if layer.ffn.kind is FfnKind.MLP else
                 {"ffn"} if layer.ffn.kind is FfnKind.LINEAR else set())
        assert set(linears) == want, i
        for lin, rule in linears.items():
            w = ck.tensors[f"{prefix}{lin}.weight"]
            ws, acts = ck.tensors[f"{prefix}{lin}.{WEIGHT_SCALE}"], ck.tensors[f"{prefix}{lin}.{ACT_SCALE}"]
            assert w.dtype == FP8_DTYPE and ws.dtype == acts.dtype == torch.float32
            assert ws.shape == acts.shape == (1,) and float(ws) > 0 and float(acts) > 0
            orig = torch.cat([src.get(n) for n in rule.hf_names(i)], dim=0)
            assert abs(float(orig.float().abs().max()) / FP8_MAX - float(ws)) <= 1e-6 * float(ws) or \
                lin in ("attention.qkv", "ffn.fc", "ffn.gate")  # fused groups share the group max
            assert float(ws) >= float(orig.float().abs().max()) / FP8_MAX * (1 - 1e-6)
            assert _within_fp8_rounding(dequantize(w, ws), orig, ws), f"{prefix}{lin}"
            seen.add(f"{prefix}{lin}")
        kv = f"{prefix}attention.{KV_SCALE}"
        assert (kv in ck.tensors) == (layer.attention.kind is AttnKind.ATTENTION), i
        if kv in ck.tensors:
            assert float(ck.tensors[kv]) >= 1.0  # clamped by default
    fp8_names = {n.rsplit(".weight", 1)[0] for n, t in ck.tensors.items() if t.dtype == FP8_DTYPE}
    assert fp8_names == seen  # nothing else (embedding, norms, lm_head) is FP8
    scale_owners = {n.rsplit(".", 1)[0] for n in ck.tensors if n.endswith((WEIGHT_SCALE, ACT_SCALE))}
    assert scale_owners == seen
    assert ck.tensors["lm_head.weight"].dtype == torch.bfloat16


def test_synthetic_tp_layouts_merge_to_the_same_tensors(syn_fp8):
    base = load_checkpoint(syn_fp8[1]).tensors
    for tp in (2, 4):
        other = load_checkpoint(syn_fp8[tp]).tensors
        assert set(other) == set(base)
        for name, t in base.items():
            assert torch.equal(_bits(other[name]), _bits(t)), (tp, name)


def test_whole_model_flag_gives_the_same_checkpoint(syn, syn_fp8, tmp_path):
    out = tmp_path / "whole"
    assert main(["quantize", "--model_dir", str(syn), "--output_dir", str(out), "--dtype", "bfloat16",
                 "--kv_cache_dtype", "fp8", "--calib_size", "6", "--calib_max_seq_length", "48",
                 "--batch_size", "2", "--whole_model", "--recipe", "max", "--skip_eval"]) == 0
    a, b = load_checkpoint(out).tensors, load_checkpoint(syn_fp8[1]).tensors
    assert set(a) == set(b) and all(torch.equal(_bits(a[n]), _bits(b[n])) for n in a)


def test_activations_on_disk_give_the_same_scales(syn, tmp_path):
    from nasrt.quantize.layerwise import calibrate_layerwise

    spec = load_spec(syn)
    batches = calibration_batches(syn, spec, SYN_OPTS)
    settings = QuantSettings(kv_cache_dtype="fp8")
    mem = calibrate_layerwise(SafetensorsReader(syn), spec, batches, settings, torch.bfloat16, progress=False)
    disk = calibrate_layerwise(SafetensorsReader(syn), spec, batches, settings, torch.bfloat16, progress=False,
                               max_memory_bytes=0, spill_dir=tmp_path)
    assert mem.keys() == disk.keys() and len(mem) > 0
    assert all(torch.equal(mem[m][k], disk[m][k]) for m in mem for k in mem[m])
    assert list(tmp_path.iterdir()) == []  # the spilled activations are removed


def test_kv_cache_scales_calibrated_keeps_values(syn, syn_fp8, tmp_path):
    out = quantize_checkpoint(syn, tmp_path / "cal", QuantizeOptions(**{**SYN_OPTS.__dict__,
                                                                        "kv_cache_scales": "calibrated"}),
                              progress=False).output_dir
    hf = quantize_checkpoint(syn, tmp_path / "hf", QuantizeOptions(**{**SYN_OPTS.__dict__, "export_format": "hf"}),
                             progress=False).output_dir
    cal, clamped = load_checkpoint(out).tensors, load_checkpoint(syn_fp8[1]).tensors
    hf_t = load_file(str(hf / "model.safetensors"))
    kv_names = [n for n in cal if n.endswith(KV_SCALE)]
    assert kv_names
    for name in kv_names:
        i = name.split(".")[2]
        k, v = hf_t[f"model.layers.{i}.self_attn.k_proj.k_scale"], hf_t[f"model.layers.{i}.self_attn.v_proj.v_scale"]
        assert float(cal[name]) == max(float(k), float(v))
        assert float(clamped[name]) == max(float(k), float(v), 1.0)
    assert any(float(cal[n]) < 1.0 for n in kv_names)  # random tiny model: calibrated K/V scales are small


def test_hf_export_names_and_dtypes(syn, tmp_path):
    out = quantize_checkpoint(syn, tmp_path / "hf", QuantizeOptions(**{**SYN_OPTS.__dict__, "export_format": "hf"}),
                              progress=False).output_dir
    spec = load_spec(syn)
    src = SafetensorsReader(syn)
    t = load_file(str(out / "model.safetensors"))
    expected_linears = set()
    for i, layer in enumerate(spec.layers):
        for rule in layer_rules(layer):
            for name in rule.hf_names(i):
                if rule.linear:
                    expected_linears.add(name)
                    mod = name.rsplit(".weight", 1)[0]
                    ws, ins = t[f"{mod}.weight_scale"], t[f"{mod}.input_scale"]
                    assert t[name].dtype == FP8_DTYPE and ws.dtype == ins.dtype == torch.float32
                    assert ws.shape == ins.shape == ()
                    orig = src.get(name)
                    # one weight scale per fused group (q/k/v, gate/up): the max, as TensorRT-LLM's loaders fuse
                    group = next((g for g in FP8_FUSED_GROUPS if rule.linear in g), (rule.linear,))
                    members = [n for r in layer_rules(layer) if r.linear in group for n in r.hf_names(i)]
                    want = max(float(src.get(n).float().abs().max()) for n in members) / FP8_MAX
                    assert abs(float(ws) - want) <= 1e-6 * float(ws)
                    assert _within_fp8_rounding(dequantize(t[name], ws), orig, ws), name
                else:
                    assert t[name].dtype == torch.bfloat16, name
        has_kv = layer.attention.kind is AttnKind.ATTENTION
        assert (f"model.layers.{i}.self_attn.k_proj.k_scale" in t) == has_kv
        assert (f"model.layers.{i}.self_attn.v_proj.v_scale" in t) == has_kv
        if has_kv:  # q/k/v read one input: one shared input_scale
            ins = {float(t[f"model.layers.{i}.self_attn.{p}_proj.input_scale"]) for p in "qkv"}
            assert len(ins) == 1
    assert {n for n, x in t.items() if x.dtype == FP8_DTYPE} == expected_linears
    assert t[lm_head_rule(spec).hf_names()[0]].dtype == torch.bfloat16
    hq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hq == {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "modelopt" and cfg["block_configs"]
    assert (out / "tokenizer.json").is_file()
    assert load_spec(out) == spec


def test_quantize_lm_head_hf_export(syn, tmp_path):
    out = quantize_checkpoint(syn, tmp_path / "hf", QuantizeOptions(**{**SYN_OPTS.__dict__, "export_format": "hf",
                                                                       "quantize_lm_head": True}),
                              progress=False).output_dir
    t = load_file(str(out / "model.safetensors"))
    assert t["lm_head.weight"].dtype == FP8_DTYPE and float(t["lm_head.input_scale"]) > 0
    assert _within_fp8_rounding(dequantize(t["lm_head.weight"], t["lm_head.weight_scale"]),
                                SafetensorsReader(syn).get("lm_head.weight"), t["lm_head.weight_scale"])
    assert t["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"] == []


def test_quantize_lm_head_trtllm(syn, tmp_path):
    out = quantize_checkpoint(syn, tmp_path / "q", QuantizeOptions(**{**SYN_OPTS.__dict__, "quantize_lm_head": True}),
                              progress=False).output_dir
    ck = load_checkpoint(out)
    assert ck.tensors["lm_head.weight"].dtype == FP8_DTYPE
    assert float(ck.tensors[f"lm_head.{WEIGHT_SCALE}"]) > 0 and float(ck.tensors[f"lm_head.{ACT_SCALE}"]) > 0
    assert ck.config["quantization"]["exclude_modules"] == []


def test_device_cuda(syn, tmp_path, capsys):
    """Without a GPU: a clear error and no output. With one: the same scales as on the CPU (bf16 GEMMs differ)."""
    code = _cli(syn, tmp_path / "o", "--device", "cuda", "--kv_cache_dtype", "fp8")
    if not torch.cuda.is_available():
        assert code == 2 and "no CUDA GPU is available" in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
        return
    assert code == 0
    assert _cli(syn, tmp_path / "c", "--kv_cache_dtype", "fp8") == 0
    a, b = load_checkpoint(tmp_path / "o").tensors, load_checkpoint(tmp_path / "c").tensors
    for name, t in b.items():
        if name.endswith((WEIGHT_SCALE, ACT_SCALE, KV_SCALE)):
            assert abs(float(a[name]) - float(t)) <= 0.05 * float(t), name


# ---- calibration data -----------------------------------------------------------------------------------------

def test_calibration_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n{"text": "three"}\n')
    assert load_calibration_texts(str(tmp_path / "a.jsonl"), 2) == ["one", "two"]
    (tmp_path / "a.txt").write_text("para one\n\npara two\n")
    assert load_calibration_texts(str(tmp_path / "a.txt"), 2) == ["para one", "para two"]
    default = load_calibration_texts(None, 4)
    assert len(default) == 4 and not any(d in eval_text() for d in default)  # disjoint from the eval slice
    (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n')
    with pytest.raises(ConfigError, match="line 1 has no string field 'text'"):
        load_calibration_texts(str(tmp_path / "bad.jsonl"), 2)


def test_calibration_parquet(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # this environment's pyarrow cannot load: the error must say so clearly
        (tmp_path / "a.parquet").write_bytes(b"PAR1")
        with pytest.raises(MissingDependencyError, match="reading parquet needs a working pyarrow"):
            load_calibration_texts(str(tmp_path / "a.parquet"), 5)
        return
    pq.write_table(pa.table({"text": ["x", "y", "z"], "n": [1, 2, 3]}), tmp_path / "a.parquet")
    assert load_calibration_texts(str(tmp_path / "a.parquet"), 5) == ["x", "y", "z"]


# ---- bad input --------------------------------------------------------------------------------------------------

def _cli(syn: Path, out: Path, *extra: str) -> int:
    return main(["quantize", "--model_dir", str(syn), "--output_dir", str(out), "--calib_size", "4",
                 "--calib_max_seq_length", "32", "--skip_eval", *extra])


def test_calibration_file_missing(syn, tmp_path, capsys):
    assert _cli(syn, tmp_path / "o", "--calib_dataset", str(tmp_path / "nope.txt")) == 2
    assert "nope.txt: file not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_calibration_file_empty(syn, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    assert _cli(syn, tmp_path / "o", "--calib_dataset", str(tmp_path / "empty.jsonl")) == 2
    assert "no calibration text found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_calibration_file_shorter_than_calib_size(syn, tmp_path, caplog):
    (tmp_path / "short.txt").write_text("first paragraph of text\n\nsecond paragraph\n\nthird one here\n")
    with caplog.at_level(logging.WARNING):
        assert _cli(syn, tmp_path / "o", "--calib_dataset", str(tmp_path / "short.txt"), "--calib_size", "8") == 0
    assert "has only 3 samples" in caplog.text and "calibrating with 3" in caplog.text
    assert (tmp_path / "o" / "rank0.safetensors").is_file()


def test_unsupported_qformat(syn, tmp_path, capsys):
    assert _cli(syn, tmp_path / "o", "--qformat", "int4_awq") == 2
    err = capsys.readouterr().err
    assert "--qformat 'int4_awq' is not supported" in err and "fp8" in err
    assert not (tmp_path / "o").exists()


def test_kv_fp8_without_attention_layers_warns(tmp_path, caplog):
    d = write_synthetic(tmp_path / "noattn", "all-variants", pattern="0:N/1.0 1:L/L 2:N/N 3:L/2.0")
    write_tiny_tokenizer(d, load_spec(d).vocab_size)
    with caplog.at_level(logging.WARNING):
        assert _cli(d, tmp_path / "o", "--kv_cache_dtype", "fp8") == 0
    assert "no attention layers" in caplog.text
    ck = load_checkpoint(tmp_path / "o")
    assert ck.config["quantization"]["kv_cache_quant_algo"] is None
    assert not [n for n in ck.tensors if n.endswith(KV_SCALE)]
    assert ck.tensors["transformer.layers.1.attention.weight"].dtype == FP8_DTYPE


def test_missing_tokenizer(synthetic, tmp_path, capsys):
    assert _cli(synthetic, tmp_path / "o") == 2
    assert "no tokenizer found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_existing_output_untouched_on_error(syn, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(NasrtError, match="already exists"):
        quantize_checkpoint(syn, out, SYN_OPTS, progress=False)
    assert (out / "keep").read_text() == "x"
