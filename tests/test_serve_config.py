"""Issue 9 scope 2: ``nasrt serve-config`` and the planner's PyTorch backend.

The 51B numbers are derived here from the raw ``block_configs`` (tests/hf_reference.py, decilm-architecture.md
section 7) and the planner's stated constants, not through nasrt's planner, then compared with the YAML and plan.
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from hf_reference import raw_layers

from nasrt.cli import main
from nasrt.deploy import plan as planner
from nasrt.deploy.pytorch.llm_api import (
    KV_CACHE_CONFIG,
    LLM_ARGS,
    MODEL_YAML_ARGS,
    SERVE_YAML_ARGS,
    check_args,
)
from nasrt.deploy.pytorch.serve_config import MAX_DEFAULT_BATCH, ServeRequest, plan_serve_config
from nasrt.errors import ConfigError
from nasrt.fixtures import write_config_only

MiB = 1024**2

#: LLM-API arguments of TensorRT-LLM 1.2-1.4 (shared/reference/triton-trtllm.md section 8b), pinned here.
PINNED_TOP = {"model", "backend", "tensor_parallel_size", "pipeline_parallel_size", "trust_remote_code", "dtype",
              "max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len", "enable_chunked_prefill",
              "kv_cache_config", "cuda_graph_config", "scheduler_config", "speculative_config"}
PINNED_KV = {"free_gpu_memory_fraction", "max_tokens", "max_gpu_total_bytes", "enable_block_reuse", "dtype",
             "tokens_per_block", "host_cache_size"}


@pytest.fixture(scope="module")
def m51_fp8(tmp_path_factory):
    """The full-size 51B config as ModelOpt's unified FP8 checkpoint declares it (config only, no weights)."""
    d = write_config_only("nemotron-51b", tmp_path_factory.mktemp("sc51") / "m")
    (d / "hf_quant_config.json").write_text(json.dumps(
        {"producer": {"name": "modelopt"},
         "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}))
    return d, json.loads((d / "config.json").read_text())


def test_llm_api_table_is_the_pinned_list():
    assert set(LLM_ARGS) == PINNED_TOP and set(KV_CACHE_CONFIG) == PINNED_KV
    assert "model" not in SERVE_YAML_ARGS and "triton_config" in MODEL_YAML_ARGS
    assert "kv_cache_dtype" not in LLM_ARGS


def _derive_51b(cfg: dict, batch: int, seq: int) -> dict:
    """The planner's numbers for 51B on one H100-80GB, FP8 weights + FP8 KV, PyTorch backend, from first principles."""
    h, v, nh = cfg["hidden_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    hd = h // nh
    layers = raw_layers(cfg)
    linear_elems = n_linears = n_attn = norms = 0
    for ak, kv, fk, inter in layers:
        if ak == "attention":
            linear_elems += (nh + 2 * kv) * hd * h + h * nh * hd  # qkv + dense
            n_linears, n_attn, norms = n_linears + 2, n_attn + 1, norms + h
        elif ak == "linear":
            linear_elems, n_linears, norms = linear_elems + h * h, n_linears + 1, norms + h
        if fk == "mlp":
            linear_elems, n_linears, norms = linear_elems + 3 * h * inter, n_linears + 3, norms + h
        elif fk == "linear":
            linear_elems, n_linears, norms = linear_elems + h * h, n_linears + 1, norms + h
    # FP8 linears: 1 byte + weight and activation float32 scales; KV scale per attention layer; lm_head,
    # embedding and norms BF16
    weights = linear_elems + 8 * n_linears + 4 * n_attn + 2 * (2 * v * h + norms + h)
    kv_max = max(kv for ak, kv, _, _ in layers if ak == "attention")
    i_max = max(inter for *_, inter in layers)
    per_token = (3 * h + (nh + 2 * kv_max) * hd + 3 * i_max) * 2  # 16-bit activations
    act = 8192 * per_token + batch * v * 4  # max_num_tokens in flight + float32 logits
    reserve = (512 + 1536) * MiB  # CUDA context + PyTorch runtime (stated)
    graphs = 256 * MiB + batch * per_token + batch * v * 4  # decode step of the largest captured batch
    free = 81559 * MiB - weights - act - reserve - graphs
    kv_tok = sum(kv for ak, kv, _, _ in layers if ak == "attention") * 2 * hd * 1
    tokens = int(int(free * 0.9) // kv_tok) // 32 * 32
    return {"weights": weights, "act": act, "reserve": reserve, "graphs": graphs, "free": free, "kv_tok": kv_tok,
            "tokens": tokens, "max_batch": tokens // 32 // math.ceil(seq / 32)}


def test_51b_fp8_on_one_h100_values_are_the_planners(m51_fp8, tmp_path, capsys):
    d, cfg = m51_fp8
    out = tmp_path / "o"
    assert main(["serve-config", "--model_dir", str(d), "--gpu", "h100-80gb", "--tp", "1", "--kv_cache_dtype", "fp8",
                 "--batch", "8", "--seq", "8192", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    args = yaml.safe_load((out / "trtllm-serve.yaml").read_text())
    check_args(args, SERVE_YAML_ARGS)
    assert args == {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "max_batch_size": 8, "max_seq_len": 8192,
                    "max_num_tokens": 8192, "enable_chunked_prefill": False,
                    "kv_cache_config": {"free_gpu_memory_fraction": 0.9, "tokens_per_block": 32, "dtype": "fp8"},
                    "cuda_graph_config": {"max_batch_size": 8, "enable_padding": True}}
    want = _derive_51b(cfg, 8, 8192)
    rank = json.loads((out / "plan.json").read_text())["plan"]["ranks"][0]
    assert (rank["weight_bytes"], rank["activation_bytes"], rank["reserve_bytes"], rank["cuda_graph_bytes"]) == \
        (want["weights"], want["act"], want["reserve"], want["graphs"])
    assert rank["free_bytes"] == want["free"] and rank["kv_bytes_per_token"] == want["kv_tok"] == 92.75 * 1024
    assert rank["max_kv_tokens"] == want["tokens"] >= 8 * 8192  # it fits, with the derivation shown above
    assert f"max batch at seq 8192: {want['max_batch']}" in printed
    assert f"trtllm-serve {d.resolve()} --config {(out / 'trtllm-serve.yaml').resolve()} --tp_size 1 " \
           "--trust_remote_code --host 127.0.0.1 --port 8000" in printed
    assert "CUDA graphs" in printed and "backend pytorch" in printed


def test_default_batch_is_the_largest_that_fits(m51_fp8, tmp_path):
    d, cfg = m51_fp8
    sc = plan_serve_config(d, ServeRequest(kv_cache_dtype="fp8", seq=8192), tmp_path / "o")
    b = sc.args["max_batch_size"]
    assert sc.plan.fits and 1 < b <= MAX_DEFAULT_BATCH and sc.args["cuda_graph_config"]["max_batch_size"] == b
    assert _derive_51b(cfg, b, 8192)["tokens"] >= b * 8192
    assert _derive_51b(cfg, b + 1, 8192)["tokens"] < (b + 1) * 8192  # one more sequence does not fit
    assert sc.args["max_seq_len"] == 8192  # explicit, never the config's 131072


def test_long_sequences_enable_chunked_prefill(m51_fp8, tmp_path):
    sc = plan_serve_config(m51_fp8[0], ServeRequest(kv_cache_dtype="fp8", batch=1, seq=32768), tmp_path / "o")
    assert sc.args["enable_chunked_prefill"] is True and sc.args["max_seq_len"] == 32768


def test_plan_that_does_not_fit_is_refused_unless_force(m51_fp8, tmp_path, capsys):
    d = tmp_path / "bf16"
    write_config_only("nemotron-51b", d)  # BF16 weights: ~96 GiB on an 80 GB GPU
    out = tmp_path / "o"
    assert main(["serve-config", "--model_dir", str(d), "--output_dir", str(out), "--batch", "1", "--seq", "4096"]) == 2
    err = capsys.readouterr().err
    assert "serve-config: error: the plan does not fit" in err and "--force" in err and not out.exists()
    assert main(["serve-config", "--model_dir", str(d), "--output_dir", str(out), "--batch", "1", "--seq", "4096",
                 "--force"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert json.loads((out / "plan.json").read_text())["forced"] is True
    check_args(yaml.safe_load((out / "trtllm-serve.yaml").read_text()))
    # KV budget too small for the request: also refused
    assert main(["serve-config", "--model_dir", str(m51_fp8[0]), "--output_dir", str(tmp_path / "o2"),
                 "--batch", "64", "--seq", "131072"]) == 2
    assert "KV cache holds" in capsys.readouterr().err


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.update(kv_cache_dtype="fp8"), "'kv_cache_dtype' is not an LLM-API argument.*kv_cache_config.dtype"),
    (lambda a: a.update(max_seq_length=4096), "'max_seq_length' is not an LLM-API argument"),
    (lambda a: a["kv_cache_config"].update(free_gpu_mem_fraction=0.8), "'kv_cache_config.free_gpu_mem_fraction'"),
    (lambda a: a["cuda_graph_config"].update(padding=True), "'cuda_graph_config.padding'"),
    (lambda a: a.update(max_batch_size="8"), "max_batch_size = .* must be int"),
    (lambda a: a.update(enable_chunked_prefill=1), "enable_chunked_prefill = 1 must be bool"),
    (lambda a: a["kv_cache_config"].update(dtype="int8"), "kv_cache_config.dtype"),
    (lambda a: a.update(model="x"), "'model' is not an LLM-API argument"),  # positional for trtllm-serve
])
def test_validator_rejects_what_the_llm_api_rejects(m51_fp8, tmp_path, mutate, match):
    args = plan_serve_config(m51_fp8[0], ServeRequest(kv_cache_dtype="fp8", batch=4, seq=4096), tmp_path).args
    check_args(args)
    mutate(args)
    with pytest.raises(ConfigError, match=match):
        check_args(args)


def test_bad_flags(m51_fp8, tmp_path, capsys):
    d = m51_fp8[0]
    assert main(["serve-config", "--model_dir", str(d), "--seq", "200000", "--output_dir", str(tmp_path / "o")]) == 2
    assert "max_position_embeddings 131072" in capsys.readouterr().err
    assert main(["serve-config", "--model_dir", str(d), "--tp", "3", "--output_dir", str(tmp_path / "o")]) == 2
    assert "serve-config: error:" in capsys.readouterr().err


def test_plan_backend_pytorch_adds_the_cuda_graph_pool(m51_fp8, capsys):
    d = m51_fp8[0]
    common = ["plan", "--model", str(d), "--dtype", "fp8", "--kv_cache_dtype", "fp8", "--batch", "8", "--seq", "8192",
              "--json"]
    assert main(common) == 0
    engine = json.loads(capsys.readouterr().out)["ranks"][0]
    assert main([*common, "--backend", "pytorch"]) == 0
    torch_ = json.loads(capsys.readouterr().out)["ranks"][0]
    assert engine["cuda_graph_bytes"] == 0 and torch_["cuda_graph_bytes"] > 0
    assert engine["weight_bytes"] == torch_["weight_bytes"] and engine["kv_heads"] == torch_["kv_heads"] == 371
    extra = torch_["cuda_graph_bytes"] + (planner.RESERVE_PYTORCH_RUNTIME - planner.RESERVE_RUNTIME)
    assert engine["free_bytes"] - torch_["free_bytes"] == extra
