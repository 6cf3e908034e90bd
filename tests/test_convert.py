"""Acceptance tests of the HF -> TensorRT-LLM converter (issue 2).

Expected rank tensors are computed here independently of ``nasrt.sharding`` / ``nasrt.tensor_map``: straight from
the HF safetensors files and the rules of shared/reference/trtllm-checkpoint-format.md (sections 2-4).
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
from hf_reference import raw_layers
from safetensors.torch import load_file, save_file

import nasrt.convert as convert_mod
from nasrt.cli import main
from nasrt.convert import ConvertOptions, convert_checkpoint
from nasrt.errors import CheckpointError, ConfigError, OutputExistsError, ShardingError
from nasrt.fixtures import random_tensors, write_hf_checkpoint
from nasrt.presets import hf_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- independent reference -------------------------------------------------------------------------------

def hf_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def hf_layers(cfg: dict) -> list[dict]:
    """Per layer: attention kind + kv, ffn kind + width, read straight from the HF block_configs."""
    return [{"attention": {"impl": ak, "num_key_value_heads": kv or None},
             "ffn": {"impl": fk, "intermediate_size": inter or None}} for ak, kv, fk, inter in raw_layers(cfg)]


def stage_layers(n_layers: int, pp: int, pp_rank: int) -> list[int]:
    counts = [n_layers // pp + (1 if s < n_layers % pp else 0) for s in range(pp)]
    start = sum(counts[:pp_rank])
    return list(range(start, start + counts[pp_rank]))


def pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    rows = math.ceil(t.shape[0] / multiple) * multiple
    return torch.cat([t, torch.zeros(rows - t.shape[0], *t.shape[1:], dtype=t.dtype)])


def kv_shard(w: torch.Tensor, kv: int, hd: int, tp: int, r: int) -> torch.Tensor:
    if tp > kv:  # every KV head repeated tp/kv times consecutively, then split
        w = w.reshape(kv, hd, -1).repeat_interleave(tp // kv, dim=0).reshape(kv * (tp // kv) * hd, -1)
    return w.chunk(tp, dim=0)[r]


def expected_rank(hf: dict[str, torch.Tensor], cfg: dict, tp: int, pp: int, rank: int, dtype: torch.dtype,
                  par_emb: bool = False, emb_dim: int = 0) -> dict[str, torch.Tensor]:
    tp_rank, pp_rank = rank % tp, rank // tp
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    hd = h // nh
    layers = hf_layers(cfg)
    tied = cfg.get("tie_word_embeddings", False)
    out: dict[str, torch.Tensor] = {}
    emb = hf["model.embed_tokens.weight"]
    if pp_rank == 0:
        if not par_emb:
            out["transformer.vocab_embedding.weight"] = emb
        elif emb_dim == 0:
            out["transformer.vocab_embedding.weight"] = pad_rows(emb, tp).chunk(tp, dim=0)[tp_rank]
        else:
            out["transformer.vocab_embedding.weight"] = emb.chunk(tp, dim=1)[tp_rank]
    for i, g in enumerate(stage_layers(len(layers), pp, pp_rank)):
        src, dst, la = f"model.layers.{g}.", f"transformer.layers.{i}.", layers[g]
        if la["attention"]["impl"] == "attention":
            kv = la["attention"]["num_key_value_heads"]
            out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
            q = hf[src + "self_attn.q_proj.weight"].chunk(tp, dim=0)[tp_rank]
            k = kv_shard(hf[src + "self_attn.k_proj.weight"], kv, hd, tp, tp_rank)
            v = kv_shard(hf[src + "self_attn.v_proj.weight"], kv, hd, tp, tp_rank)
            out[dst + "attention.qkv.weight"] = torch.cat([q, k, v])
            out[dst + "attention.dense.weight"] = hf[src + "self_attn.o_proj.weight"].chunk(tp, dim=1)[tp_rank]
        elif la["attention"]["impl"] == "linear":
            out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
            out[dst + "attention.weight"] = hf[src + "self_attn.linear_attn.weight"].chunk(tp, dim=0)[tp_rank]
        if la["ffn"]["impl"] == "mlp":
            out[dst + "post_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
            out[dst + "ffn.fc.weight"] = hf[src + "mlp.gate_proj.weight"].chunk(tp, dim=0)[tp_rank]
            out[dst + "ffn.gate.weight"] = hf[src + "mlp.up_proj.weight"].chunk(tp, dim=0)[tp_rank]
            out[dst + "ffn.proj.weight"] = hf[src + "mlp.down_proj.weight"].chunk(tp, dim=1)[tp_rank]
        elif la["ffn"]["impl"] == "linear":
            out[dst + "post_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
            out[dst + "ffn.weight"] = hf[src + "mlp.linear_mlp.weight"].chunk(tp, dim=0)[tp_rank]
    if pp_rank == pp - 1:
        out["transformer.ln_f.weight"] = hf["model.norm.weight"]
        head = emb if tied else hf["lm_head.weight"]
        out["lm_head.weight"] = pad_rows(head, tp).chunk(tp, dim=0)[tp_rank]
    return {n: t.to(dtype) for n, t in out.items()}


def assert_rank_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rank: int) -> None:
    assert sorted(got) == sorted(want), f"rank {rank}: tensor names differ"
    for name, t in want.items():
        assert got[name].dtype == t.dtype, f"rank {rank} {name}: dtype {got[name].dtype} != {t.dtype}"
        assert got[name].shape == t.shape, f"rank {rank} {name}: shape {tuple(got[name].shape)} != {tuple(t.shape)}"
        assert torch.equal(got[name], t), f"rank {rank} {name}: values differ"


def dir_digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_ref(synthetic) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((synthetic / "config.json").read_text()), hf_tensors(synthetic)


def check_checkpoint(out: Path, cfg: dict, hf: dict[str, torch.Tensor], tp: int, pp: int, dtype: str,
                     par_emb: bool = False, emb_dim: int = 0) -> None:
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["config.json"] + [f"rank{r}.safetensors" for r in range(tp * pp)])
    for rank in range(tp * pp):
        got = load_file(str(out / f"rank{rank}.safetensors"))
        want = expected_rank(hf, cfg, tp, pp, rank, DTYPES[dtype], par_emb, emb_dim)
        assert_rank_equal(got, want, rank)


# ---- value checks over the tp x pp matrix -----------------------------------------------------------------

@pytest.mark.parametrize("pp", [1, 2, 3])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_synthetic_tp_pp_values(synthetic, hf_ref, tmp_path, tp, pp):
    cfg, hf = hf_ref
    out = convert_checkpoint(synthetic, tmp_path / "ckpt", ConvertOptions("bfloat16", tp, pp), progress=False)
    check_checkpoint(out, cfg, hf, tp, pp, "bfloat16")
    tcfg = json.loads((out / "config.json").read_text())
    assert tcfg["mapping"]["tp_size"] == tp and tcfg["mapping"]["pp_size"] == pp
    assert tcfg["mapping"]["world_size"] == tp * pp
    assert "rank" not in tcfg["mapping"]


@pytest.mark.parametrize(("tp", "pp", "emb_dim"), [(4, 3, None), (8, 2, 0), (2, 3, 1)])
def test_merged_ranks_equal_tp1(synthetic, tmp_path, tp, pp, emb_dim):
    """nasrt.trtllm_ckpt merges any layout back to exactly the tp = pp = 1 tensors (global layer names)."""
    from nasrt.trtllm_ckpt import load_checkpoint

    base = load_file(str(convert_checkpoint(synthetic, tmp_path / "tp1", ConvertOptions("bfloat16"),
                                            progress=False) / "rank0.safetensors"))
    opts = ConvertOptions("bfloat16", tp, pp, use_parallel_embedding=emb_dim is not None,
                          embedding_sharding_dim=emb_dim or 0)
    merged = load_checkpoint(convert_checkpoint(synthetic, tmp_path / "ckpt", opts, progress=False)).tensors
    assert sorted(merged) == sorted(base)
    assert all(torch.equal(merged[n], base[n]) for n in base)


def test_synthetic_config_json(synthetic, hf_ref, tmp_path):
    cfg, _ = hf_ref
    out = convert_checkpoint(synthetic, tmp_path / "ckpt", ConvertOptions("auto", 2, 1), progress=False)
    tcfg = json.loads((out / "config.json").read_text())
    layers = hf_layers(cfg)
    assert tcfg["architecture"] == "DeciLMForCausalLM"
    assert tcfg["dtype"] == cfg["torch_dtype"] == "bfloat16"  # auto = HF torch_dtype
    assert tcfg["layer_configs"] == layers
    assert tcfg["layer_types"] == [la["attention"]["impl"] for la in layers]
    assert tcfg["num_kv_heads_per_layer"] == [la["attention"]["num_key_value_heads"] for la in layers
                                              if la["attention"]["impl"] == "attention"]
    assert tcfg["num_kv_heads_per_layer"] == [8, 4, 1, 2, 4]  # the all-variants pattern g1, g2, g8, g4, g2
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "max_position_embeddings",
                "hidden_act"):
        assert tcfg[key] == cfg[key], key
    assert tcfg["norm_epsilon"] == cfg["rms_norm_eps"]
    assert tcfg["head_size"] == tcfg["rotary_embedding_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert tcfg["position_embedding_type"] == "rope_gpt_neox"
    assert tcfg["rotary_base"] == float(cfg["rope_theta"])
    assert tcfg["rotary_scaling"] == {**cfg["rope_scaling"], "rope_type": "llama3"}
    assert tcfg["quantization"]["quant_algo"] is None and tcfg["quantization"]["kv_cache_quant_algo"] is None
    assert tcfg["use_parallel_embedding"] is False and tcfg["embedding_sharding_dim"] == 0
    # the minimal form TensorRT-LLM 1.2's Mapping(**d) accepts (attention / MoE sizes derived from tp)
    assert tcfg["mapping"] == {"world_size": 2, "gpus_per_node": 8, "cp_size": 1, "tp_size": 2, "pp_size": 1}


@pytest.mark.parametrize(("tp", "emb_dim"), [(2, 0), (4, 0), (8, 0), (2, 1), (4, 1)])
def test_parallel_embedding(synthetic, hf_ref, tmp_path, tp, emb_dim):
    cfg, hf = hf_ref
    opts = ConvertOptions("bfloat16", tp, 1, use_parallel_embedding=True, embedding_sharding_dim=emb_dim)
    out = convert_checkpoint(synthetic, tmp_path / "ckpt", opts, progress=False)
    check_checkpoint(out, cfg, hf, tp, 1, "bfloat16", par_emb=True, emb_dim=emb_dim)
    tcfg = json.loads((out / "config.json").read_text())
    assert tcfg["use_parallel_embedding"] is True and tcfg["embedding_sharding_dim"] == emb_dim
    if emb_dim == 0:  # V = 1003 is odd: rows padded to ceil(V/tp) per rank, the padding is zeros
        last = load_file(str(out / f"rank{tp - 1}.safetensors"))["transformer.vocab_embedding.weight"]
        assert last.shape[0] == math.ceil(cfg["vocab_size"] / tp)
        assert not last[cfg["vocab_size"] - (tp - 1) * last.shape[0]:].any()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_dtypes(synthetic, hf_ref, tmp_path, dtype):
    cfg, hf = hf_ref
    out = convert_checkpoint(synthetic, tmp_path / "ckpt", ConvertOptions(dtype, 2, 2), progress=False)
    check_checkpoint(out, cfg, hf, 2, 2, dtype)
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_lm_head_padding_is_zero(synthetic, hf_ref, tmp_path):
    cfg, hf = hf_ref
    out = convert_checkpoint(synthetic, tmp_path / "ckpt", ConvertOptions("bfloat16", 8, 1), progress=False)
    heads = [load_file(str(out / f"rank{r}.safetensors"))["lm_head.weight"] for r in range(8)]
    full = torch.cat(heads)
    assert full.shape[0] == 1008 and cfg["vocab_size"] == 1003
    assert torch.equal(full[:1003], hf["lm_head.weight"]) and not full[1003:].any()


def test_column_slices_through_small_read_buffer(synthetic, hf_ref, tmp_path, monkeypatch):
    """ROW-split tensors (o_proj, down_proj, dim-1 embedding) are gathered in row chunks; force many chunks."""
    import nasrt.st_io as st_io

    monkeypatch.setattr(st_io, "_CHUNK_BYTES", 100)  # a few rows per chunk, uneven last chunk
    cfg, hf = hf_ref
    opts = ConvertOptions("bfloat16", 4, 1, use_parallel_embedding=True, embedding_sharding_dim=1)
    out = convert_checkpoint(synthetic, tmp_path / "ckpt", opts, progress=False)
    check_checkpoint(out, cfg, hf, 4, 1, "bfloat16", par_emb=True, emb_dim=1)


def test_unchanged_bytes_are_copied_file_to_file(synthetic, hf_ref, tmp_path, monkeypatch):
    """bf16 -> bf16: whole tensors and row slices go through FileRange copies; a cast never does."""
    import nasrt.st_io as st_io

    copied = []
    real = st_io._copy_range
    monkeypatch.setattr(st_io, "_copy_range", lambda r, *a: (copied.append(r), real(r, *a))[1])
    cfg, hf = hf_ref
    convert_checkpoint(synthetic, tmp_path / "bf16", ConvertOptions("bfloat16", 2, 1), progress=False)
    assert copied and all(isinstance(r, st_io.FileRange) for r in copied)
    copied.clear()
    out = convert_checkpoint(synthetic, tmp_path / "f16", ConvertOptions("float16", 2, 1), progress=False)
    assert copied == []
    check_checkpoint(out, cfg, hf, 2, 1, "float16")


@pytest.mark.parametrize("mode", ["disabled", "oserror"])
def test_copy_file_range_fallback(synthetic, hf_ref, tmp_path, monkeypatch, mode):
    import errno
    import os

    import nasrt.st_io as st_io

    monkeypatch.setattr(st_io, "_CHUNK_BYTES", 1000)  # several pread chunks per tensor
    if mode == "disabled":
        monkeypatch.setattr(st_io, "_COPY_FILE_RANGE", [False])
    else:
        monkeypatch.setattr(st_io, "_COPY_FILE_RANGE", [True])

        def exdev(*a, **k):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", exdev, raising=False)
    cfg, hf = hf_ref
    out = convert_checkpoint(synthetic, tmp_path / "ckpt", ConvertOptions("bfloat16", 4, 2), progress=False)
    check_checkpoint(out, cfg, hf, 4, 2, "bfloat16")


def test_workers_match_serial(synthetic, tmp_path):
    opts = ConvertOptions("bfloat16", 2, 2)
    serial = convert_checkpoint(synthetic, tmp_path / "serial", opts, progress=False)
    par = convert_checkpoint(synthetic, tmp_path / "par", opts, workers=2, progress=False)
    assert dir_digest(serial) == dir_digest(par)


def test_kv_heads_neither_divides(tmp_path):
    cfg = hf_config("0:g2/20.0 1:g1/20.0", hidden_size=48, num_attention_heads=6, vocab_size=50)  # kv 3, 6; I 768
    src = tmp_path / "hf"
    write_hf_checkpoint(src, cfg, random_tensors(cfg))
    with pytest.raises(ShardingError, match=r"model\.layers\.0\.self_attn\.k_proj.*3 KV heads.*--tp_size 2"):
        convert_checkpoint(src, tmp_path / "ckpt", ConvertOptions("bfloat16", 2, 1), progress=False)
    assert not (tmp_path / "ckpt").exists()
    # tp 3 divides kv 3 and 6 and the 6 heads: fine
    convert_checkpoint(src, tmp_path / "ok", ConvertOptions("bfloat16", 3, 1), progress=False)
    assert len(list((tmp_path / "ok").glob("rank*.safetensors"))) == 3


def test_pp_larger_than_layers(synthetic, tmp_path):
    with pytest.raises(ShardingError, match=r"--pp_size 9.*8 layers"):
        convert_checkpoint(synthetic, tmp_path / "ckpt", ConvertOptions("bfloat16", 1, 9), progress=False)


def test_tp_not_dividing_heads_synthetic(synthetic, tmp_path):
    with pytest.raises(ShardingError, match=r"8 attention heads.*--tp_size 3"):
        convert_checkpoint(synthetic, tmp_path / "ckpt", ConvertOptions("bfloat16", 3, 1), progress=False)


# ---- the real SmolLM2 ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_tensors(smollm2) -> dict[str, torch.Tensor]:
    return load_file(str(smollm2 / "model.safetensors"))


@pytest.mark.parametrize("tp", [1, 3])
def test_smollm2_converts(smollm2, smollm2_tensors, tmp_path, tp):
    hf = smollm2_tensors
    hcfg = json.loads((smollm2 / "config.json").read_text())
    assert hcfg["tie_word_embeddings"] and "lm_head.weight" not in hf
    out = convert_checkpoint(smollm2, tmp_path / "ckpt", ConvertOptions("auto", tp, 1), progress=False)
    tcfg = json.loads((out / "config.json").read_text())
    assert tcfg["dtype"] == "float16"  # HF float32 + auto -> float16 as in TensorRT-LLM's infer_dtype
    assert tcfg["num_kv_heads_per_layer"] == [3] * 30
    assert tcfg["rotary_base"] == 100000.0
    hd, f16 = 64, torch.float16
    emb = hf["model.embed_tokens.weight"].to(f16)
    qs, ks, heads = [], [], []
    for r in range(tp):
        got = load_file(str(out / f"rank{r}.safetensors"))
        assert torch.equal(got["transformer.vocab_embedding.weight"], emb)
        heads.append(got["lm_head.weight"])
        qkv = got["transformer.layers.7.attention.qkv.weight"]
        assert qkv.shape == ((9 // tp + 2 * 3 // tp) * hd, 576)
        qs.append(qkv[: 9 // tp * hd])
        ks.append(qkv[9 // tp * hd: (9 // tp + 3 // tp) * hd])
        assert torch.equal(got["transformer.layers.29.ffn.fc.weight"],
                           hf["model.layers.29.mlp.gate_proj.weight"].to(f16).chunk(tp)[r])
        assert torch.equal(got["transformer.layers.29.ffn.proj.weight"],
                           hf["model.layers.29.mlp.down_proj.weight"].to(f16).chunk(tp, dim=1)[r])
        assert torch.equal(got["transformer.ln_f.weight"], hf["model.norm.weight"].to(f16))
    assert torch.equal(torch.cat(heads), emb)  # tied: lm_head = embedding (49152 % 3 == 0, no padding)
    assert torch.equal(torch.cat(qs), hf["model.layers.7.self_attn.q_proj.weight"].to(f16))
    assert torch.equal(torch.cat(ks), hf["model.layers.7.self_attn.k_proj.weight"].to(f16))


def test_smollm2_tp2_names_nine_heads(smollm2, tmp_path):
    with pytest.raises(ShardingError, match=r"\b9 attention heads\b"):
        convert_checkpoint(smollm2, tmp_path / "ckpt", ConvertOptions("auto", 2, 1), progress=False)
    assert not (tmp_path / "ckpt").exists()


# ---- bad input ------------------------------------------------------------------------------------------------

def _index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def _convert(src: Path, dst: Path, **kw):
    return convert_checkpoint(src, dst, ConvertOptions("bfloat16", 2, 1), progress=False, **kw)


def test_missing_shard_file(synthetic_copy, tmp_path):
    shard = sorted(synthetic_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"missing.*{shard.name}"):
        _convert(synthetic_copy, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_tensor_named_in_index_absent_from_shard(synthetic_copy, tmp_path):
    idx = _index(synthetic_copy)
    name = "model.layers.2.self_attn.v_proj.weight"
    shard = synthetic_copy / idx["weight_map"][name]
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard))  # the index still names it
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*absent.*{name}"):
        _convert(synthetic_copy, tmp_path / "ckpt")


def test_shard_file_not_in_index_is_ignored_but_tensor_missing(synthetic_copy, tmp_path):
    idx = _index(synthetic_copy)
    name = "model.layers.0.mlp.up_proj.weight"
    del idx["weight_map"][name]
    (synthetic_copy / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=rf"missing tensor.*{name}"):
        _convert(synthetic_copy, tmp_path / "ckpt")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors(synthetic_copy, tmp_path, keep):
    shard = sorted(synthetic_copy.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=rf"{shard.name}"):
        _convert(synthetic_copy, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_truncated_header(synthetic_copy, tmp_path):
    shard = sorted(synthetic_copy.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=rf"{shard.name}.*not a readable safetensors"):
        _convert(synthetic_copy, tmp_path / "ckpt")


def test_shape_contradicts_config(synthetic_copy, tmp_path):
    cfg = json.loads((synthetic_copy / "config.json").read_text())
    cfg["block_configs"][1]["ffn"]["ffn_mult"] = 3.0  # width 256 instead of the stored 512
    (synthetic_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.\w+_proj\.weight.*shape.*512.*256"):
        _convert(synthetic_copy, tmp_path / "ckpt")


def test_shape_of_stored_tensor_wrong(synthetic_copy, tmp_path):
    idx = _index(synthetic_copy)
    name = "model.layers.3.self_attn.linear_attn.weight"
    shard = synthetic_copy / idx["weight_map"][name]
    tensors = load_file(str(shard))
    tensors[name] = tensors[name][:32].clone()
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=rf"{name}.*\[32, 64\].*\[64, 64\]"):
        _convert(synthetic_copy, tmp_path / "ckpt")


def test_missing_tensor_single_file(tmp_path):
    cfg = hf_config("0:g2/1.0 1:L/N", hidden_size=64, num_attention_heads=8, vocab_size=100)
    tensors = random_tensors(cfg)
    del tensors["model.layers.1.input_layernorm.weight"]
    write_hf_checkpoint(tmp_path / "hf", cfg, tensors)
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.1\.input_layernorm\.weight"):
        _convert(tmp_path / "hf", tmp_path / "ckpt")


def test_unused_tensor_refused(tmp_path):
    cfg = hf_config("0:g2/1.0 1:N/1.0", hidden_size=64, num_attention_heads=8, vocab_size=100)
    tensors = random_tensors(cfg)
    tensors["model.layers.1.input_layernorm.weight"] = torch.ones(64, dtype=torch.bfloat16)  # no_op has no norm
    write_hf_checkpoint(tmp_path / "hf", cfg, tensors)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.input_layernorm\.weight.*not used"):
        _convert(tmp_path / "hf", tmp_path / "ckpt")


@pytest.mark.parametrize(("sub", "field", "value"), [
    ("attention", "mamba", {"state_dim": 16}),
    ("attention", "window_length", 4096),
    ("attention", "num_sink_tokens", 4),
    ("attention", "sparsify", ["q_proj"]),
    ("ffn", "moe", {"num_local_experts": 8}),
])
def test_unknown_block_variant(synthetic_copy, tmp_path, sub, field, value):
    cfg = json.loads((synthetic_copy / "config.json").read_text())
    cfg["block_configs"][5][sub][field] = value
    (synthetic_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=rf"layer 5 {sub}.*{field}"):
        _convert(synthetic_copy, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_existing_output_refused_then_overwritten(synthetic, hf_ref, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(OutputExistsError, match=r"--output_dir .*ckpt.*--overwrite"):
        _convert(synthetic, out)
    assert (out / "stale.txt").read_text() == "old"
    _convert(synthetic, out, overwrite=True)
    assert not (out / "stale.txt").exists()
    cfg, hf = hf_ref
    check_checkpoint(out, cfg, hf, 2, 1, "bfloat16")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp or old siblings left


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_conversion(synthetic, tmp_path, monkeypatch, exc, existing):
    real = convert_mod.write_safetensors_stream
    calls = []

    def interrupted(path, specs, tensors, metadata=None):
        calls.append(path)

        def some():
            for n, t in enumerate(tensors):
                if len(calls) == 2 and n == 3:  # second rank, mid-file
                    raise exc("simulated interruption")
                yield t
        return real(path, specs, some(), metadata)

    monkeypatch.setattr(convert_mod, "write_safetensors_stream", interrupted)
    out = tmp_path / "ckpt"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("previous")
    with pytest.raises(exc):
        _convert(synthetic, out, overwrite=existing)
    assert len(calls) == 2
    if existing:  # the previous output survives untouched
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ckpt"] if existing else [])


def test_inputs_never_modified(synthetic_copy, tmp_path):
    before = dir_digest(synthetic_copy)
    mtimes = {p: p.stat().st_mtime_ns for p in synthetic_copy.iterdir()}
    convert_checkpoint(synthetic_copy, tmp_path / "a", ConvertOptions("float16", 4, 3), progress=False)
    with pytest.raises(ShardingError):
        convert_checkpoint(synthetic_copy, tmp_path / "b", ConvertOptions("bfloat16", 3, 1), progress=False)
    assert dir_digest(synthetic_copy) == before
    assert {p: p.stat().st_mtime_ns for p in synthetic_copy.iterdir()} == mtimes


def test_output_inside_input_refused(synthetic_copy):
    before = dir_digest(synthetic_copy)
    with pytest.raises(Exception, match=r"overlaps the input"):
        _convert(synthetic_copy, synthetic_copy / "ckpt")
    assert dir_digest(synthetic_copy) == before


def test_no_pickle_ever_loaded(tmp_path, monkeypatch):
    cfg = hf_config("0:g2/1.0", hidden_size=64, num_attention_heads=8, vocab_size=100)
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}))

    def forbidden(*a, **k):
        raise AssertionError("a pickle loader was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors.*pytorch_model\.bin.*never loaded"):
        _convert(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_missing_config(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(ConfigError, match=r"hf/config\.json: file not found"):
        _convert(tmp_path / "hf", tmp_path / "ckpt")


# ---- the command line ------------------------------------------------------------------------------------------

def test_cli_convert_ok(synthetic, hf_ref, tmp_path, capsys):
    out = tmp_path / "ckpt"
    rc = main(["--model_dir", str(synthetic), "--output_dir", str(out), "--dtype", "float16", "--tp_size", "4",
               "--pp_size", "2", "--use_parallel_embedding", "--embedding_sharding_dim", "1", "--workers", "2"],
              command="convert")
    assert rc == 0
    assert str(out) in capsys.readouterr().out
    cfg, hf = hf_ref
    check_checkpoint(out, cfg, hf, 4, 2, "float16", par_emb=True, emb_dim=1)


@pytest.mark.parametrize(("damage", "args", "pattern"), [
    ("none", ["--tp_size", "3"], r"8 attention heads.*--tp_size 3"),
    ("none", ["--pp_size", "20"], r"--pp_size 20"),
    ("shard", [], r"shard file\(s\) named in the index are missing.*model-00002-of-00003\.safetensors"),
    ("window", [], r"layer 0 attention.*window_length"),
    ("exists", [], r"already exists.*--overwrite"),
])
def test_cli_errors(synthetic_copy, tmp_path, capsys, damage, args, pattern):
    out = tmp_path / "ckpt"
    if damage == "shard":
        (synthetic_copy / "model-00002-of-00003.safetensors").unlink()
    elif damage == "window":
        cfg = json.loads((synthetic_copy / "config.json").read_text())
        cfg["block_configs"][0]["attention"]["window_length"] = 4096
        (synthetic_copy / "config.json").write_text(json.dumps(cfg))
    elif damage == "exists":
        out.mkdir()
    rc = main(["--model_dir", str(synthetic_copy), "--output_dir", str(out), *args], command="convert")
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("nasrt convert: error: ")
    assert len(err.strip().splitlines()) == 1  # no traceback
    assert re.search(pattern, err), err
    if damage != "exists":
        assert not out.exists()

