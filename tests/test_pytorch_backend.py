"""Issue 9 scope 1: the reference runtime reads what TensorRT-LLM's PyTorch backend reads -- the HF dir (BF16 /
FP32) and ModelOpt's unified HF FP8 checkpoint -- and gives the same logits as on nasrt's converted checkpoint; both
FP8 exports of one calibration carry the same quantized values."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nasrt.cli import main
from nasrt.convert import ConvertOptions, convert_checkpoint
from nasrt.errors import CheckpointError, ConfigError
from nasrt.fp8 import FP8_DTYPE, dequantize, quantize
from nasrt.hf_ckpt import load_hf_checkpoint, read_quantization
from nasrt.quantize import QuantizeOptions, quantize_checkpoint
from nasrt.runtime import load_model
from nasrt.runtime.model import checkpoint_format
from nasrt.trtllm_ckpt import load_checkpoint

TOL = 1e-5


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 19), generator=g)


def _max_diff(a_dir, b_dir) -> float:
    a, b = load_model(a_dir, dtype="float32"), load_model(b_dir, dtype="float32")
    ids = _ids(a.vocab_size)
    la, lb = a.logits(ids), b.logits(ids)
    assert la.shape == lb.shape and bool(torch.isfinite(la).all())
    mask = torch.tensor([[0, 0, 0] + [1] * 16, [1] * 19])  # left padding too
    lam, lbm = a.logits(ids, mask), b.logits(ids, mask)
    return max(float((la - lb).abs().max()), float((lam - lbm).abs().max()))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


# ---- BF16 / FP32 HF dirs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixture", ["smollm2", "synthetic"])
def test_hf_dir_logits_equal_converted_checkpoint(fixture, request, tmp_path):
    hf = request.getfixturevalue(fixture)
    ckpt = convert_checkpoint(hf, tmp_path / "ckpt", ConvertOptions("float32"), progress=False)
    assert checkpoint_format(hf) == "hf" and checkpoint_format(ckpt) == "trtllm"
    assert _max_diff(hf, ckpt) <= TOL
    # the same in-memory checkpoint: every tensor equal to the converted one (values, names)
    mine, conv = load_hf_checkpoint(hf), load_checkpoint(ckpt)
    assert mine.tensors.keys() == conv.tensors.keys()
    assert all(torch.equal(mine.tensors[n].float(), conv.tensors[n].float()) for n in conv.tensors)
    assert dataclasses.replace(mine.spec, torch_dtype="float32") == conv.spec  # converted with --dtype float32


# ---- unified HF FP8 vs TensorRT-LLM FP8 from the same calibration ----------------------------------------------

SYN_OPTS = QuantizeOptions(dtype="bfloat16", kv_cache_dtype="fp8", calib_size=6, calib_max_seq_length=48,
                           batch_size=2, kv_cache_scales="calibrated", skip_eval=True)
SMOL_OPTS = QuantizeOptions(dtype="bfloat16", kv_cache_dtype="fp8", calib_size=2, calib_max_seq_length=16,
                            batch_size=2, kv_cache_scales="calibrated", skip_eval=True)


def _both_exports(hf, root, opts: QuantizeOptions):
    trt = quantize_checkpoint(hf, root / "trt", opts, progress=False)
    uni = quantize_checkpoint(hf, root / "hf", QuantizeOptions(**{**opts.__dict__, "export_format": "hf"}),
                              progress=False)
    assert trt.amax.keys() == uni.amax.keys()  # one calibration: the two runs see the same amax values
    assert all(torch.equal(trt.amax[m][k], uni.amax[m][k]) for m in trt.amax for k in trt.amax[m])
    return trt.output_dir, uni.output_dir


@pytest.fixture(scope="module")
def syn_fp8(tmp_path_factory):
    from nasrt.arch import load_spec
    from nasrt.fixtures import write_synthetic
    from nasrt.quantize.tiny_tokenizer import write_tiny_tokenizer

    root = tmp_path_factory.mktemp("pt_syn_fp8")
    hf = write_synthetic(root / "src", "all-variants")
    write_tiny_tokenizer(hf, load_spec(hf).vocab_size)  # calibration needs a tokenizer
    return (hf, *_both_exports(hf, root, SYN_OPTS))


@pytest.fixture(scope="module")
def smol_fp8(smollm2, tmp_path_factory):
    return (smollm2, *_both_exports(smollm2, tmp_path_factory.mktemp("pt_smol_fp8"), SMOL_OPTS))


@pytest.mark.parametrize("which", ["syn_fp8", pytest.param("smol_fp8", marks=pytest.mark.slow)])
def test_fp8_exports_carry_the_same_quantized_values(which, request):
    _src, trt_dir, hf_dir = request.getfixturevalue(which)
    trt, uni = load_checkpoint(trt_dir), load_hf_checkpoint(hf_dir)
    assert uni.quant_algo == trt.quant_algo == "FP8" and uni.kv_cache_quant_algo == trt.kv_cache_quant_algo == "FP8"
    assert uni.tensors.keys() == trt.tensors.keys()
    fp8 = 0
    for name, t in trt.tensors.items():
        mine = uni.tensors[name]
        assert mine.dtype == t.dtype and mine.shape == t.shape, name
        assert torch.equal(_bits(mine), _bits(t)), name  # bit for bit: FP8 codes, scales, BF16 tensors
        fp8 += t.dtype == FP8_DTYPE
    assert fp8 == sum(1 for n in load_file(str(hf_dir / "model.safetensors")).values() if n.dtype == FP8_DTYPE) - \
        sum(la.has_kv_cache for la in trt.spec.layers) * 2  # q|k|v fused into one tensor per attention layer
    assert any(n.endswith("kv_cache_scaling_factor") for n in trt.tensors)


@pytest.mark.parametrize("which", ["syn_fp8", pytest.param("smol_fp8", marks=pytest.mark.slow)])
def test_fp8_hf_checkpoint_logits_equal_trtllm_fp8(which, request):
    _src, trt_dir, hf_dir = request.getfixturevalue(which)
    assert _max_diff(hf_dir, trt_dir) <= TOL


@pytest.mark.slow
def test_run_py_model_dir_generates_what_the_trtllm_checkpoint_generates(smol_fp8, capsys):
    _src, trt_dir, hf_dir = smol_fp8
    flags = ["--input_text", "What is the capital of France?", "--chat", "--max_output_len", "12", "--no-streaming",
             "--dtype", "float32"]
    assert main(["run", "--model_dir", str(hf_dir), *flags]) == 0
    a = capsys.readouterr().out
    assert main(["run", "--checkpoint_dir", str(trt_dir), "--tokenizer_dir", str(hf_dir), *flags]) == 0
    b = capsys.readouterr().out
    assert 'Output: "' in a and a == b


@pytest.mark.slow
def test_eval_perplexity_model_dir_equals_checkpoint_dir(smol_fp8, capsys):
    _src, trt_dir, hf_dir = smol_fp8
    flags = ["--max_chars", "600", "--max_seq_len", "64", "--dtype", "float32"]
    assert main(["eval", "perplexity", "--model_dir", str(hf_dir), *flags]) == 0
    a = capsys.readouterr().out
    assert main(["eval", "perplexity", "--checkpoint_dir", str(trt_dir), "--tokenizer_dir", str(hf_dir), *flags]) == 0
    b = capsys.readouterr().out
    assert a.split()[1] == b.split()[1], (a, b)  # same perplexity to 4 decimals


# ---- quantization config sources and ModelOpt's per-projection weight scales ----------------------------------

def test_quantization_read_from_hf_quant_config_first_then_config_json(syn_fp8, tmp_path):
    _src, _trt, hf_dir = syn_fp8
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    q = read_quantization(d)
    assert (q.quant_algo, q.kv_cache_quant_algo, q.exclude_modules) == ("FP8", "FP8", ("lm_head",))
    assert q.source.endswith("hf_quant_config.json")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "compressed-tensors"  # ignored: hf_quant_config.json wins
    (d / "config.json").write_text(json.dumps(cfg))
    assert read_quantization(d).source.endswith("hf_quant_config.json")
    (d / "hf_quant_config.json").unlink()
    with pytest.raises(ConfigError, match="quant_method"):
        read_quantization(d)
    cfg["quantization_config"]["quant_method"] = "modelopt"
    cfg["quantization_config"].pop("kv_cache_quant_algo", None)  # ModelOpt's inline form: kv_cache_scheme only
    (d / "config.json").write_text(json.dumps(cfg))
    q = read_quantization(d)
    assert (q.quant_algo, q.kv_cache_quant_algo, q.exclude_modules) == ("FP8", "FP8", ("lm_head",))
    assert q.source.endswith("config.json")
    assert _max_diff(d, hf_dir) == 0.0


def test_per_projection_weight_scales_are_requantized_like_the_pytorch_backend(syn_fp8, tmp_path):
    """ModelOpt 0.47 writes one weight scale per projection; the loader re-quantizes q/k/v (and gate/up) to the
    group max as TensorRT-LLM's ``rescale_fused_weights`` does: FP8 -> model dtype, * own / max, -> FP8."""
    _src, _trt, hf_dir = syn_fp8
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    t = load_file(str(d / "model.safetensors"))
    # a projection that does not own its group's max: its own scale is smaller than the shared one
    cands = [(i, p) for i in range(8) for p in ("k_proj", "v_proj", "q_proj")
             if f"model.layers.{i}.self_attn.{p}.weight" in t]
    layer, proj = next((i, p) for i, p in cands
                       if float(dequantize(t[f"model.layers.{i}.self_attn.{p}.weight"],
                                           t[f"model.layers.{i}.self_attn.{p}.weight_scale"]).abs().max()) / 448.0
                       < float(t[f"model.layers.{i}.self_attn.{p}.weight_scale"]))
    k = f"model.layers.{layer}.self_attn.{proj}"
    group = t[f"{k}.weight_scale"]
    w = dequantize(t[f"{k}.weight"], group)
    own = (w.abs().max() / 448.0).reshape(())
    t[f"{k}.weight"], t[f"{k}.weight_scale"] = quantize(w, own), own  # per-projection, as ModelOpt writes it
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    ck = load_hf_checkpoint(d)
    qkv = ck.tensors[f"transformer.layers.{layer}.attention.qkv.weight"]
    sizes = [t[f"model.layers.{layer}.self_attn.{p}_proj.weight"].shape[0] for p in "qkv"]
    start = sum(sizes[:"qkv".index(proj[0])])
    got = qkv[start:start + t[f"{k}.weight"].shape[0]]
    want = (t[f"{k}.weight"].to(torch.bfloat16) * own.to(torch.bfloat16) / group.to(torch.bfloat16)).to(FP8_DTYPE)
    assert torch.equal(_bits(got), _bits(want))
    back = dequantize(got, group).float()
    assert bool(((back - w.float()).abs() <= w.float().abs() * 2.0 ** -3 + float(group) * 2.0 ** -9).all())
    assert float(ck.tensors[f"transformer.layers.{layer}.attention.qkv.weights_scaling_factor"]) == float(group)


@pytest.mark.parametrize("damage, match", [
    ("drop_input_scale", "needs 'model.layers.*input_scale'"),
    ("no_quant_config", "is FP8 but"),
    ("fp8_norm", "is not a quantizable linear weight"),
    ("drop_k_scale", "k_scale' is missing"),
    ("exclude_layer", "exclude_modules"),
])
def test_bad_fp8_checkpoints_are_refused_by_name(syn_fp8, tmp_path, damage, match, capsys):
    _src, _trt, hf_dir = syn_fp8
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    t = load_file(str(d / "model.safetensors"))
    hq = json.loads((d / "hf_quant_config.json").read_text())
    if damage == "drop_input_scale":
        del t[next(n for n in t if n.endswith("o_proj.input_scale"))]
    elif damage == "no_quant_config":
        (d / "hf_quant_config.json").unlink()
        cfg = json.loads((d / "config.json").read_text())
        del cfg["quantization_config"]
        (d / "config.json").write_text(json.dumps(cfg))
    elif damage == "fp8_norm":
        n = next(n for n in t if n.endswith("input_layernorm.weight"))
        t[n] = t[n].to(FP8_DTYPE)
    elif damage == "drop_k_scale":
        del t[next(n for n in t if n.endswith("k_scale"))]
    elif damage == "exclude_layer":
        hq["quantization"]["exclude_modules"] = ["lm_head", "model.layers.*.mlp.down_proj"]
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    if (d / "hf_quant_config.json").exists():
        (d / "hf_quant_config.json").write_text(json.dumps(hq))
    match = match.replace("*", ".*")
    with pytest.raises(CheckpointError, match=match):
        load_hf_checkpoint(d)
    assert main(["run", "--model_dir", str(d), "--input_text", "hi", "--tokenizer_dir", str(hf_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nasrt run: error:") and "Traceback" not in err


def test_run_py_flags(synthetic, capsys):
    assert main(["run", "--model_dir", str(synthetic), "--checkpoint_dir", str(synthetic), "--input_text", "x"]) == 2
    assert "got both (--checkpoint_dir and --model_dir)" in capsys.readouterr().err
