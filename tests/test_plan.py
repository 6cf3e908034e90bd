"""Acceptance tests of the memory planner (issue 5, item 5).

Expected numbers are derived here from the raw ``block_configs`` with the formulas of
shared/reference/decilm-architecture.md section 7 (not through ``nasrt.arch``), then compared with the planner; the
published 51B figures (51.5 B parameters, 371 KV heads = 185.5 KiB/token BF16) are pinned on top.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hf_reference import raw_layers

from nasrt.arch import load_spec
from nasrt.cli import main
from nasrt.convert import ConvertOptions, convert_checkpoint
from nasrt.deploy.plan import GPUS, PlanRequest, plan_memory, render
from nasrt.errors import ConfigError, ShardingError
from nasrt.fixtures import write_config_only

KiB, GiB = 1024, 1024**3


# ---- independent derivation from the raw config ----------------------------------------------------------

def expected_params(cfg: dict) -> int:
    """decilm-architecture.md section 7: GQA 2H^2 + 2*H*kv*hd + H; linear H^2 + H; SwiGLU 3HI + H; 2VH + H."""
    h, v, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    total = 2 * v * h + h
    for ak, kv, fk, inter in raw_layers(cfg):
        total += {"attention": 2 * h * h + 2 * h * kv * hd + h, "linear": h * h + h, "no_op": 0}[ak]
        total += {"mlp": 3 * h * inter + h, "linear": h * h + h, "no_op": 0}[fk]
    return total


def expected_rank_kv_heads(cfg: dict, tp: int) -> int:
    return sum(math.ceil(kv / tp) for ak, kv, _, _ in raw_layers(cfg) if ak == "attention")


@pytest.fixture(scope="module")
def cfg51(tmp_path_factory) -> tuple[Path, dict]:
    d = write_config_only("nemotron-51b", tmp_path_factory.mktemp("c51") / "nemotron-51b")
    return d, json.loads((d / "config.json").read_text())


@pytest.fixture(scope="module")
def spec51(cfg51):
    return load_spec(cfg51[0])


# ---- 51B acceptance numbers ------------------------------------------------------------------------------

def test_51b_layer_composition_matches_reference_table(cfg51):
    layers = raw_layers(cfg51[1])
    kvs = sorted(kv for ak, kv, _, _ in layers if ak == "attention")
    assert len(layers) == 80
    assert {k: kvs.count(k) for k in set(kvs)} == {8: 44, 4: 1, 2: 6, 1: 3}  # 54 GQA layers
    assert sum(ak == "linear" for ak, *_ in layers) == 18
    assert sum(ak == "no_op" for ak, *_ in layers) == 8
    widths = [i for *_, i in layers]
    assert {w: widths.count(w) for w in set(widths)} == {28672: 44, 14336: 16, 7168: 20}


def test_51b_parameters(cfg51, spec51):
    want = expected_params(cfg51[1])
    plan = plan_memory(spec51, PlanRequest(gpu="h100-80gb", dtype="fp8"))
    assert plan.num_params == want
    assert round(want / 1e9, 1) == 51.5  # the published "51.5B"
    assert sum(plan.per_layer_params) + 2 * 128256 * 8192 + 8192 == want


def test_51b_kv_cache_per_token_bf16_and_fp8(cfg51, spec51):
    heads = expected_rank_kv_heads(cfg51[1], 1)
    assert heads == 371
    bf16 = plan_memory(spec51, PlanRequest(gpu="h100-80gb", tp=2, dtype="bfloat16", kv_cache_dtype="bfloat16"))
    plan_tp1 = plan_memory(spec51, PlanRequest(gpu="h100-80gb", dtype="bfloat16"))
    fp8 = plan_memory(spec51, PlanRequest(gpu="h100-80gb", dtype="fp8"))  # auto -> FP8 KV
    assert plan_tp1.kv_heads_total == 371
    assert plan_tp1.ranks[0].kv_bytes_per_token == 371 * 2 * 128 * 2 == 185.5 * KiB
    assert fp8.ranks[0].kv_bytes_per_token == 371 * 2 * 128 * 1 == 92.75 * KiB
    assert bf16.ranks[0].kv_bytes_per_token == 187 * 2 * 128 * 2


@pytest.mark.parametrize("tp,heads", [(1, 371), (2, 187), (4, 98), (8, 54)])
def test_51b_per_rank_kv_heads_under_tp(cfg51, spec51, tp, heads):
    assert expected_rank_kv_heads(cfg51[1], tp) == heads
    plan = plan_memory(spec51, PlanRequest(gpu="h200-141gb", tp=tp, dtype="fp8"))
    assert [r.kv_heads for r in plan.ranks] == [heads] * tp
    assert plan.ranks[0].kv_bytes_per_token == heads * 2 * 128 * 1
    assert spec51.kv_bytes_per_token(1, tp) == heads * 256


def test_51b_weight_bytes_fp8_and_bf16(cfg51, spec51):
    cfg = cfg51[1]
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    layers = raw_layers(cfg)
    params = expected_params(cfg)
    # norms: one per non-no_op sub-block plus the final norm; embedding + lm_head untied
    norms = h * (sum(ak != "no_op" for ak, *_ in layers) + sum(fk != "no_op" for _, _, fk, _ in layers) + 1)
    linears = params - norms - 2 * v * h
    n_linear_modules = sum({"attention": 2, "linear": 1, "no_op": 0}[ak] + {"mlp": 3, "linear": 1, "no_op": 0}[fk]
                           for ak, _, fk, _ in layers)
    n_attn = sum(ak == "attention" for ak, *_ in layers)
    fp8_bytes = linears + 2 * (norms + 2 * v * h) + 8 * n_linear_modules + 4 * n_attn
    fp8 = plan_memory(spec51, PlanRequest(gpu="h100-80gb", dtype="fp8"))
    assert fp8.ranks[0].weight_bytes == fp8_bytes
    assert 49 * GiB < fp8_bytes < 51 * GiB  # "FP8 about 51.5 GB", slightly more with 16-bit embedding/lm_head
    bf16 = plan_memory(spec51, PlanRequest(gpu="h100-80gb", dtype="bfloat16"))
    assert bf16.ranks[0].weight_bytes == 2 * params  # "BF16 about 103 GB"
    assert round(2 * params / 1e9) == 103

    # tp 2: q/o/FFN/linear halved, ceil(kv/2) K/V heads, replicated embedding + norms, lm_head rows V/2
    hd = h // cfg["num_attention_heads"]
    per_rank = v * h + v // 2 * h + norms
    for ak, kv, fk, inter in layers:
        if ak == "attention":
            per_rank += (h // 2 + 2 * math.ceil(kv / 2) * hd) * h + h * h // 2
        elif ak == "linear":
            per_rank += h // 2 * h
        per_rank += {"mlp": 3 * inter // 2 * h, "linear": h // 2 * h, "no_op": 0}[fk]
    tp2 = plan_memory(spec51, PlanRequest(gpu="h100-80gb", tp=2, dtype="bfloat16"))
    assert [r.weight_bytes for r in tp2.ranks] == [2 * per_rank] * 2


def test_51b_fp8_fits_one_h100_bf16_needs_two(spec51):
    batch, seq = 16, 8192  # the shipped profiles' max_batch_size x max_seq_len
    fp8 = plan_memory(spec51, PlanRequest(gpu="h100-80gb", dtype="fp8", batch=batch, seq=seq))
    assert fp8.fits, fp8.reason
    one = plan_memory(spec51, PlanRequest(gpu="h100-80gb", dtype="bfloat16", batch=batch, seq=seq))
    assert not one.fits
    assert "exceed" in one.reason and "h100-80gb" in one.reason and one.ranks[0].free_bytes < 0
    two = plan_memory(spec51, PlanRequest(gpu="h100-80gb", tp=2, dtype="bfloat16", batch=batch, seq=seq))
    assert two.fits, two.reason
    a100 = plan_memory(spec51, PlanRequest(gpu="a100-80gb", tp=2, dtype="bfloat16", batch=batch, seq=seq))
    assert a100.fits, a100.reason


def test_capacity_derivation_is_consistent(spec51):
    req = PlanRequest(gpu="h100-80gb", dtype="fp8", batch=16, seq=8192, kv_fraction=0.9, tokens_per_block=32)
    plan = plan_memory(spec51, req)
    r = plan.ranks[0]
    assert r.free_bytes == GPUS["h100-80gb"].memory_bytes - r.weight_bytes - r.activation_bytes - r.reserve_bytes
    assert r.activation_bytes > 0 and r.reserve_bytes >= 1 * GiB
    budget = int(r.free_bytes * 0.9)
    assert r.max_kv_tokens == int(budget // (92.75 * KiB)) // 32 * 32
    assert plan.max_batch == r.max_kv_tokens // 8192
    assert plan.max_batch >= 16
    # ~ 25 GiB of FP8 KV cache holds ~ 283K tokens (reference table) -> the planner is in that range
    assert 200_000 < r.max_kv_tokens < 300_000


def test_kv_capacity_no_fit_reason(spec51):
    plan = plan_memory(spec51, PlanRequest(gpu="h100-80gb", dtype="fp8", batch=64, seq=8192))
    assert not plan.fits
    assert "KV cache holds" in plan.reason and str(64 * 8192) in plan.reason
    assert plan.ranks[0].free_bytes > 0


def test_request_errors(spec51):
    with pytest.raises(ConfigError, match="--gpu 'h100'"):
        plan_memory(spec51, PlanRequest(gpu="h100"))
    with pytest.raises(ConfigError, match="a100-80gb.*FP8"):
        plan_memory(spec51, PlanRequest(gpu="a100-80gb", dtype="fp8"))
    with pytest.raises(ConfigError, match="--batch 0"):
        plan_memory(spec51, PlanRequest(batch=0))
    with pytest.raises(ShardingError, match="tp_size 3"):
        plan_memory(spec51, PlanRequest(tp=3))


# ---- exactness on a real converted checkpoint ------------------------------------------------------------

def rank_file_bytes(path: Path) -> int:
    """Tensor bytes of a safetensors file, from its header's data offsets."""
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")


@pytest.mark.parametrize("tp,pp", [(2, 1), (4, 2)])
def test_weight_bytes_equal_rank_files(synthetic, tmp_path, tp, pp):
    """Duplicated K/V heads (kv 1/2 < tp), lm_head padding (V = 1003) and pp stages, counted as written."""
    ckpt = convert_checkpoint(synthetic, tmp_path / "ckpt", ConvertOptions("bfloat16", tp, pp), progress=False)
    spec = load_spec(ckpt)
    plan = plan_memory(spec, PlanRequest(gpu="l4-24gb", tp=tp, pp=pp, dtype="bfloat16"))
    assert len(plan.ranks) == tp * pp
    for r in plan.ranks:
        assert r.weight_bytes == rank_file_bytes(ckpt / f"rank{r.rank}.safetensors"), r.rank


def test_cli_plan_no_fit_then_fit_and_plot(cfg51, tmp_path, capsys):
    rc = main(["plan", "--model", str(cfg51[0]), "--gpu", "h100-80gb", "--dtype", "bfloat16", "--batch", "16",
               "--seq", "8192"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "DOES NOT FIT" in out and "smallest tp that fits (h100-80gb, pp 1): 2" in out
    assert "371 KV heads x 2 (K,V) x 128 x 2 B = 185.50 KiB/token" in out
    png = tmp_path / "plot" / "51b.png"
    rc = main(["plan", "--model", str(cfg51[0]), "--profile", "h100x1-fp8", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0 and "FITS" in out and "92.75 KiB/token" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert list(png.parent.iterdir()) == [png]  # no temporary left behind


def test_cli_plan_json_and_checkpoint_defaults(synthetic, tmp_path, capsys):
    ckpt = convert_checkpoint(synthetic, tmp_path / "ckpt", ConvertOptions("bfloat16", 2, 1), progress=False)
    assert main(["plan", "--model", str(ckpt), "--gpu", "l40s-48gb", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["request"]["tp"] == 2 and data["request"]["dtype"] == "bfloat16"
    assert len(data["ranks"]) == 2 and data["fits"] is True
    assert data["gpu"]["name"] == "l40s-48gb"


def test_render_shows_derivation(spec51):
    text = render(plan_memory(spec51, PlanRequest(gpu="h100-80gb", tp=2, dtype="bfloat16")))
    assert "51.50 B" in text and "187 KV heads x 2 (K,V) x 128 x 2 B" in text
    assert "reserve" in text and "activations" in text and "0.9 of free" in text
