"""``nasrt derive`` (issue 11): fitted blocks, MIP = brute force, resumability, flags and errors on a tiny Llama;
the full pipeline once on SmolLM2 (budgets recomputed from the written config, held-out perplexity vs two
baselines, and the derived model through convert tp 1/3 -> run -> quantize -> check)."""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nasrt.derive.pipeline as pipeline
from nasrt.arch import AttnKind, FfnKind, ffn_mult_to_intermediate_size, from_hf_config, load_spec, read_json
from nasrt.cli import main
from nasrt.derive import DeriveOptions, derive
from nasrt.derive.candidates import build_block, candidate_tensors, parent_state
from nasrt.derive.fit import (
    ChannelStats,
    LeastSquares,
    distill,
    keep_channels,
    merge_kv_heads,
    narrow_ffn,
)
from nasrt.derive.library import ffn_mult_for, ffn_widths, layer_library
from nasrt.derive.score import Positions
from nasrt.derive.search import Option, SearchError, parse_budget, solve
from nasrt.errors import NasrtError
from nasrt.fixtures import random_tensors
from nasrt.quantize.tiny_tokenizer import write_tiny_tokenizer
from nasrt.tensor_map import expected_hf_tensors
from nasrt.textdata import calibration_texts, eval_text

TINY_CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 96,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512, "num_hidden_layers": 4,
            "vocab_size": 400, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 512, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
            "torch_dtype": "float32"}
TINY_ARGS = ["--calib_size", "8", "--calib_seq_len", "32", "--score_size", "2", "--score_seq_len", "32",
             "--eval_chars", "1200", "--eval_seq_len", "64", "--no_plot"]
TINY_OPTS = DeriveOptions(budget={"params": 0.8, "kv": 0.6}, calib_size=8, calib_seq_len=32, score_size=2,
                          score_seq_len=32, eval_chars=1200, eval_seq_len=64, plot=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 4-layer random Llama (hidden 96, 4 heads, 2 KV heads, FFN 512) with a small tokenizer."""
    out = tmp_path_factory.mktemp("tiny") / "hf"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(TINY_CFG))
    save_file(random_tensors(TINY_CFG, 0, torch.float32), str(out / "model.safetensors"))
    write_tiny_tokenizer(out, TINY_CFG["vocab_size"])
    return out


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    """One uninterrupted derive of the tiny model (the reference for the resume test)."""
    out = tmp_path_factory.mktemp("tiny_out") / "derived"
    return derive(tiny, out, TINY_OPTS, progress=False)


# ---- library and fitted blocks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("hidden,width", [(576, 1536), (8192, 28672), (4096, 14336), (16384, 53248)])
def test_ffn_widths_round_trip_through_ffn_mult(hidden, width):
    for tp in (1, 2, 3, 8):
        widths = ffn_widths(width, (0.87, 0.75, 0.5, 0.25, 0.1), tp)
        assert widths and all(w < width and w % 256 == 0 and w % tp == 0 for w in widths)
        for w in widths + [width]:
            if w % tp == 0:
                assert ffn_mult_to_intermediate_size(ffn_mult_for(w, hidden), hidden) == w
    assert ffn_widths(1536, (0.87, 0.75, 0.5, 0.25, 0.1), 1) == [1280, 768, 512, 256]
    assert ffn_widths(1536, (0.87, 0.75, 0.5, 0.25, 0.1), 3) == [768]


def test_smollm2_library(smollm2):
    spec = load_spec(smollm2)
    lib = layer_library(spec, 0)
    assert [c.name for c in lib["attention"]] == ["kv3", "kv1", "linear", "no_op"]
    assert [c.name for c in lib["ffn"]] == ["mlp1536", "mlp1280", "mlp768", "mlp512", "mlp256", "linear", "no_op"]
    assert lib["attention"][0].is_parent and lib["ffn"][0].is_parent
    no_lin = layer_library(spec, 0, no_linear=True, tp=3)
    assert [c.name for c in no_lin["attention"]] == ["kv3", "kv1", "no_op"]
    assert [c.name for c in no_lin["ffn"]] == ["mlp1536", "mlp768", "no_op"]


def test_least_squares_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, generator=gen)
    ls = LeastSquares(32, 24)
    for _ in range(5):
        x = torch.randn(4, 100, 32, generator=gen)
        ls.add(x, x @ w.T)
    assert torch.allclose(ls.solve(), w, atol=1e-4)


def test_linear_attention_fit_recovers_an_exactly_linear_block(tiny):
    """With one token per sequence, attention is exactly linear: o_proj . V (each query head reads its KV head).
    The fitting pass must recover that matrix."""
    spec = load_spec(tiny)
    lib = layer_library(spec, 0)
    parent = parent_state(tiny, spec, 0)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(600, 1, spec.hidden_size, generator=gen)
    fitted, _, _ = pipeline._fit_layer(spec, 0, lib, parent, h, h[:2], TINY_OPTS, Positions(spec))
    hd, nh, kv = spec.head_dim, spec.num_attention_heads, spec.layers[0].attention.num_kv_heads
    v = parent["self_attn.v_proj.weight"].view(kv, hd, -1)
    v_per_q = torch.cat([v[j // (nh // kv)] for j in range(nh)])  # [nh*hd, H]
    want = parent["self_attn.o_proj.weight"] @ v_per_q
    got = fitted["attention/linear/self_attn.linear_attn.weight"]
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-3), (got - want).abs().max()


def _out(block, h, pos):
    with torch.no_grad():
        return block(h, pos(h))


def test_merged_identical_kv_heads_reproduce_the_parent(tiny):
    spec = load_spec(tiny)
    hd = spec.head_dim
    parent = parent_state(tiny, spec, 1)
    for name in ("self_attn.k_proj.weight", "self_attn.v_proj.weight"):
        parent[name][hd:] = parent[name][:hd]  # both KV heads identical
        assert torch.equal(merge_kv_heads(parent[name], 1, hd), parent[name][:hd])
    lib = layer_library(spec, 1)
    kv1 = next(c for c in lib["attention"] if c.name == "kv1")
    state = {**candidate_tensors(spec, 1, kv1, parent, {}), **candidate_tensors(spec, 1, lib["ffn"][0], parent, {})}
    assert state["self_attn.k_proj.weight"].shape == (hd, spec.hidden_size)
    pos = Positions(spec)
    h = torch.randn(2, 16, spec.hidden_size)
    ref = _out(build_block(spec, 1, spec.layers[1], parent), h, pos)
    got = _out(build_block(spec, 1, kv1.layer(spec.layers[1]), state), h, pos)
    assert torch.allclose(got, ref, atol=1e-6, rtol=0), (got - ref).abs().max()
    # and distinct heads do change the output (the test can fail)
    other = parent_state(tiny, spec, 1)
    st2 = {**candidate_tensors(spec, 1, kv1, other, {}), **candidate_tensors(spec, 1, lib["ffn"][0], other, {})}
    ref2 = _out(build_block(spec, 1, spec.layers[1], other), h, pos)
    assert not torch.allclose(_out(build_block(spec, 1, kv1.layer(spec.layers[1]), st2), h, pos), ref2, atol=1e-4)


def test_full_width_narrowing_is_the_parent_and_keeps_the_top_channels(tiny):
    spec = load_spec(tiny)
    parent = parent_state(tiny, spec, 2)
    gate, up, down = (parent[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    width = gate.shape[0]
    stats = ChannelStats(width)
    stats.add(torch.randn(64, width))
    order = stats.order(down)
    g2, u2, d2 = narrow_ffn(gate, up, down, keep_channels(order, width))
    assert torch.equal(g2, gate) and torch.equal(u2, up) and torch.equal(d2, down)
    # channel contribution |X_i| * ||W_down[:, i]||: a channel with huge activations is kept first
    stats2 = ChannelStats(width)
    act = torch.full((8, width), 0.01)
    act[:, 77] = 100.0
    stats2.add(act)
    assert int(stats2.order(down)[0]) == 77
    assert 77 in keep_channels(stats2.order(down), 256).tolist()
    assert keep_channels(stats2.order(down), 256).tolist() == sorted(keep_channels(stats2.order(down), 256).tolist())


def test_bld_lowers_the_normalised_mse(tiny):
    spec = load_spec(tiny)
    lib = layer_library(spec, 0)
    parent = parent_state(tiny, spec, 0)
    pos = Positions(spec)
    kv1 = next(c for c in lib["attention"] if c.name == "kv1")
    state = {k: v.clone() for k, v in {**candidate_tensors(spec, 0, kv1, parent, {}),
                                       **candidate_tensors(spec, 0, lib["ffn"][0], parent, {})}.items()}
    block = build_block(spec, 0, kv1.layer(spec.layers[0]), state)
    ref = build_block(spec, 0, spec.layers[0], parent)
    x = torch.randn(2, 16, spec.hidden_size)
    with torch.no_grad():
        n = ref.input_layernorm(x)
        target = ref.self_attn(hidden_states=n, attention_mask=None, position_embeddings=pos(n))[0]
    before, after = distill(block, [(n,)], [target], 30, 1e-2,
                            lambda m, n: m.self_attn(hidden_states=n, attention_mask=None,
                                                     position_embeddings=pos(n))[0])
    assert after < 0.9 * before
    assert torch.equal(parent["self_attn.q_proj.weight"], parent_state(tiny, spec, 0)["self_attn.q_proj.weight"])


# ---- search -----------------------------------------------------------------------------------------------------

def _brute(groups, limits):
    best, arg = math.inf, None
    for pick in itertools.product(*(range(len(g)) for g in groups)):
        cost = [sum(g[k].costs[r] for g, k in zip(groups, pick, strict=True)) for r in range(len(limits))]
        if all(c <= lim + 1e-9 for c, lim in zip(cost, limits, strict=True)):
            s = sum(g[k].score for g, k in zip(groups, pick, strict=True))
            if s < best:
                best, arg = s, pick
    return best, arg


def test_search_equals_brute_force_on_random_instances():
    rng = random.Random(0)
    solved = infeasible = 0
    for _ in range(60):
        n_groups, n_res = rng.randint(2, 5), rng.randint(1, 3)
        groups = [[Option(rng.random() * (k > 0) * 3, tuple(rng.randint(0, 10) * (k == 0 or rng.random() < 0.8)
                                                               for _ in range(n_res)))
                   for k in range(rng.randint(1, 4))] for _ in range(n_groups)]
        limits = tuple(rng.uniform(0.2, 0.9) * sum(max(o.costs[r] for o in g) for g in groups)
                       for r in range(n_res))
        best, _ = _brute(groups, limits)
        if best == math.inf:
            with pytest.raises(SearchError):
                solve(groups, limits)
            infeasible += 1
            continue
        pick = solve(groups, limits)
        got = sum(g[k].score for g, k in zip(groups, pick, strict=True))
        for r in range(n_res):
            assert sum(g[k].costs[r] for g, k in zip(groups, pick, strict=True)) <= limits[r] + 1e-6
        assert got == pytest.approx(best, abs=1e-9)
        solved += 1
    assert solved >= 30 and infeasible >= 1


def test_parse_budget():
    assert parse_budget("params=0.85,kv=0.6") == {"params": 0.85, "kv": 0.6}
    assert parse_budget("params=0.85, kv=0.6, time=0.8") == {"params": 0.85, "kv": 0.6, "time": 0.8}
    for bad in ("", "mem=0.5", "kv=1.5", "kv=0", "kv=x", "kv=0.5,kv=0.4", "params"):
        with pytest.raises(NasrtError, match="--budget"):
            parse_budget(bad)


# ---- the command on the tiny model --------------------------------------------------------------------------------

def test_tiny_output_and_budgets(tiny_run, tiny):
    out = tiny_run.output_dir
    cfg = read_json(out / "config.json")
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    spec, parent = load_spec(out), load_spec(tiny)
    assert spec.num_params <= 0.8 * parent.num_params
    assert spec.kv_bytes_per_token(2) <= 0.6 * parent.kv_bytes_per_token(2)
    assert set(load_file(str(out / "model.safetensors"))) == set(expected_hf_tensors(spec))
    rep = json.loads((out / "derive_report.json").read_text())
    assert rep["measured"]["params"] == spec.num_params == rep["predicted"]["params"]
    assert rep["measured"]["kv_heads"] == sum(spec.kv_heads_per_layer) == rep["predicted"]["kv_heads"]
    assert not pipeline.work_dir_for(out).exists()
    assert (out / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def test_resume_after_interruption(tiny, tiny_run, tmp_path, monkeypatch):
    out = tmp_path / "derived"
    calls = {"fit": [], "score": []}
    real_fit, real_score = pipeline._fit_layer, pipeline.score_layer

    def fit(spec, i, *a, **k):
        calls["fit"].append(i)
        if stop["fit"] == i:
            raise KeyboardInterrupt
        return real_fit(spec, i, *a, **k)

    def score(spec, i, *a, **k):
        calls["score"].append(i)
        if stop["score"] == i:
            raise KeyboardInterrupt
        return real_score(spec, i, *a, **k)

    monkeypatch.setattr(pipeline, "_fit_layer", fit)
    monkeypatch.setattr(pipeline, "score_layer", score)
    stop = {"fit": 2, "score": None}
    with pytest.raises(KeyboardInterrupt):
        derive(tiny, out, TINY_OPTS, progress=False)
    assert not out.exists() and pipeline.work_dir_for(out).is_dir()
    stop = {"fit": None, "score": 1}
    with pytest.raises(KeyboardInterrupt):
        derive(tiny, out, TINY_OPTS, progress=False)
    assert calls["fit"] == [0, 1, 2, 2, 3] and calls["score"] == [0, 1]
    stop = {"fit": None, "score": None}
    res = derive(tiny, out, TINY_OPTS, progress=False)
    assert calls["fit"] == [0, 1, 2, 2, 3] and calls["score"] == [0, 1, 1, 2, 3]
    assert (out / "model.safetensors").read_bytes() == (tiny_run.output_dir / "model.safetensors").read_bytes()
    assert res.report["layers"] == tiny_run.report["layers"]
    assert not pipeline.work_dir_for(out).exists()


def test_changed_settings_start_afresh(tiny, tmp_path, monkeypatch):
    out = tmp_path / "derived"
    real = pipeline.score_layer
    monkeypatch.setattr(pipeline, "score_layer", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        derive(tiny, out, TINY_OPTS, progress=False)
    fitted = []
    monkeypatch.setattr(pipeline, "score_layer", real)
    real_fit = pipeline._fit_layer
    monkeypatch.setattr(pipeline, "_fit_layer", lambda spec, i, *a: fitted.append(i) or real_fit(spec, i, *a))
    derive(tiny, out, DeriveOptions(**{**TINY_OPTS.__dict__, "calib_size": 6}), progress=False)
    assert fitted == [0, 1, 2, 3]


def test_no_linear_and_bld_and_time_budget_cli(tiny, tmp_path, capsys):
    out = tmp_path / "nolin"
    assert main(["derive", "--model_dir", str(tiny), "--output_dir", str(out), "--no_linear", "--bld_steps", "3",
                 "--budget", "params=0.7,kv=0.6,time=0.9", *TINY_ARGS]) == 0
    table = capsys.readouterr().out
    assert "derived" in table and "baseline_attention_removed_last" in table
    spec, parent = load_spec(out), load_spec(tiny)
    assert all(la.attention.kind is not AttnKind.LINEAR and la.ffn.kind is not FfnKind.LINEAR for la in spec.layers)
    rep = json.loads((out / "derive_report.json").read_text())
    assert all(c["name"] != "linear" for r in rep["layers"] for s in ("attention", "ffn") for c in r["candidates"][s])
    assert rep["options"]["bld_steps"] == 3 and rep["fractions"]["derived"]["time"] <= 0.9 + 1e-9
    assert spec.num_params <= 0.7 * parent.num_params


@pytest.mark.parametrize("args,match", [
    (["--budget", "params=2"], "--budget"),
    (["--bld_steps", "100000"], "--bld_steps"),
    (["--tp", "3"], "--tp 3"),
    (["--budget", "params=0.05"], "no architecture"),
    (["--ffn_ratios", "0.5,1.5"], "--ffn_ratios"),
])
def test_bad_input_is_one_line(tiny, tmp_path, capsys, args, match):
    out = tmp_path / "bad"
    assert main(["derive", "--model_dir", str(tiny), "--output_dir", str(out), *TINY_ARGS, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nasrt derive: error:") and match in err[0], err
    assert not out.exists()


def test_existing_output_is_refused(tiny_run, tiny, capsys):
    before = (tiny_run.output_dir / "config.json").read_bytes()
    assert main(["derive", "--model_dir", str(tiny), "--output_dir", str(tiny_run.output_dir), *TINY_ARGS]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tiny_run.output_dir / "config.json").read_bytes() == before


# ---- SmolLM2: the acceptance run ---------------------------------------------------------------------------------

SMOL_OPTS = DeriveOptions(budget={"params": 0.85, "kv": 0.6}, tp=3, calib_size=16, calib_seq_len=128, score_size=4,
                          score_seq_len=64, eval_chars=2500, eval_seq_len=256)


@pytest.fixture(scope="module")
def smol(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol_derive") / "derived"
    return derive(smollm2, out, SMOL_OPTS, progress=False)


def test_smollm2_meets_the_budgets_from_the_written_config(smol, smollm2):
    spec, parent = load_spec(smol.output_dir), load_spec(smollm2)
    assert spec.num_params <= 0.85 * parent.num_params
    assert spec.kv_bytes_per_token(2) <= 0.6 * parent.kv_bytes_per_token(2)
    kinds = {(la.attention.kind, la.attention.num_kv_heads) for la in spec.layers}
    assert len(kinds) >= 2  # a real mix, not a uniform model
    cfg = read_json(smol.output_dir / "config.json")
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert len(cfg["block_configs"]) == 30 and cfg["num_key_value_heads"] is None
    for blk, la in zip(cfg["block_configs"], spec.layers, strict=True):
        if blk["ffn"]["ffn_mult"] is not None:  # the written multiplier rounds back to the chosen width
            assert ffn_mult_to_intermediate_size(blk["ffn"]["ffn_mult"], 576) == la.ffn.intermediate_size
            assert la.ffn.intermediate_size in (768, 1536)  # tp 3: widths divisible by 3
    names = set(load_file(str(smol.output_dir / "model.safetensors")))
    assert names == set(expected_hf_tensors(spec))
    for i, la in enumerate(spec.layers):
        p = f"model.layers.{i}."
        assert (p + "self_attn.linear_attn.weight" in names) == (la.attention.kind is AttnKind.LINEAR)
        assert (p + "input_layernorm.weight" in names) == (la.attention.kind is not AttnKind.NO_OP)
    assert from_hf_config(cfg).layers == spec.layers


def test_smollm2_beats_both_baselines_on_held_out_text(smol, smollm2):
    rep = smol.report
    ppl, frac = rep["perplexity"], rep["fractions"]
    print("perplexity", {k: round(v, 3) for k, v in ppl.items()})
    assert set(ppl) == {"parent", "derived", "baseline_attention_removed_last", "baseline_kv_merged_uniform"}
    assert ppl["parent"] < ppl["derived"] < min(ppl["baseline_attention_removed_last"],
                                                ppl["baseline_kv_merged_uniform"])
    for name in ("baseline_attention_removed_last", "baseline_kv_merged_uniform"):
        assert frac[name]["kv"] <= 0.6 + 1e-9
    # held-out text disjoint from every calibration text the run used
    held_out = eval_text(SMOL_OPTS.eval_chars)
    assert rep["data"]["eval_disjoint_from_calibration"] is True
    assert all(t not in held_out and held_out[:200] not in t for t in calibration_texts(500))
    assert 5 < ppl["parent"] < 40


def test_smollm2_report_files(smol):
    out = smol.output_dir
    assert (out / "derive_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "derive_table.txt").read_text()
    assert "layer  attention" in table and re.search(r"derived\s+0\.8[0-5]", table)
    rep = json.loads((out / "derive_report.json").read_text())
    assert len(rep["layers"]) == 30 and rep["peak_rss_bytes"] > 0
    chosen = [[c for c in r["candidates"][s] if c["chosen"]] for r in rep["layers"] for s in ("attention", "ffn")]
    assert all(len(c) == 1 for c in chosen)
    assert all(c["kl"] == 0 for r in rep["layers"] for s in ("attention", "ffn") for c in r["candidates"][s][:1])
    assert all(c["kl"] > 0 for r in rep["layers"] for s in ("attention", "ffn") for c in r["candidates"][s][1:])


def _answer(stdout: str) -> str:
    m = re.search(r'Output: "(.*)"', stdout, re.S)
    assert m, stdout
    return m.group(1)


def test_smollm2_derived_runs_through_the_pipeline(smol, smollm2, tmp_path, capsys):
    from nasrt.eval import perplexity
    from nasrt.runtime import load_model
    from nasrt.runtime.text import load_tokenizer

    d = str(smol.output_dir)
    ck1, ck3, fp8 = tmp_path / "tp1", tmp_path / "tp3", tmp_path / "fp8"
    for ck, tp in ((ck1, "1"), (ck3, "3")):  # convert_checkpoint.py's own entry point, unchanged flags
        assert main(["--model_dir", d, "--output_dir", str(ck), "--dtype", "float32", "--tp_size", tp],
                    command="convert") == 0
    m1, m3 = load_model(ck1), load_model(ck3)
    tok = load_tokenizer(smollm2)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    assert torch.allclose(m1.logits(ids), m3.logits(ids), atol=1e-3)
    # the written weights are the ones derive evaluated
    held = perplexity(m1, tok, eval_text(SMOL_OPTS.eval_chars), max_seq_len=SMOL_OPTS.eval_seq_len, progress=False)
    assert held == pytest.approx(smol.report["perplexity"]["derived"], rel=1e-4)
    del m3
    capsys.readouterr()
    assert main(["--checkpoint_dir", str(ck1), "--tokenizer_dir", d, "--input_text",
                 "What is the capital of France?", "--max_output_len", "24", "--chat", "--no-streaming"],
                command="run") == 0
    answer = _answer(capsys.readouterr().out)
    print("derived chat answer:", answer)
    words = re.findall(r"[A-Za-z]+", answer)
    assert len(words) >= 4 and sum(len(w) for w in words) >= 0.7 * len(answer.replace(" ", ""))
    # coherent English: the parent model finds the answer likely (random-token text scores in the thousands)
    judge = _Whole(smollm2)
    judged = perplexity(judge, tok, answer, max_seq_len=64, progress=False)
    shuffled = perplexity(judge, tok, " ".join(random.Random(0).sample(words, len(words))), max_seq_len=64,
                          progress=False)
    print(f"parent perplexity of the derived answer: {judged:.1f} (its words shuffled: {shuffled:.1f})")
    assert judged < 60 and judged < 0.5 * shuffled
    del judge
    assert main(["--model_dir", d, "--output_dir", str(fp8), "--qformat", "fp8", "--kv_cache_dtype", "fp8",
                 "--calib_size", "4", "--calib_max_seq_length", "64", "--dtype", "bfloat16"],
                command="quantize") == 0
    assert load_spec(fp8).layers == load_spec(d).layers
    for ck in (ck1, ck3, fp8):  # TensorRT-LLM 1.2's loading rules
        assert main(["check", str(ck)]) == 0, ck


class _Whole:
    """The parent as a whole in-memory model with the interface :func:`nasrt.eval.perplexity` needs."""

    def __init__(self, model_dir: Path):
        from nasrt.quantize.blocks import load_whole
        from nasrt.st_io import SafetensorsReader

        self.spec = load_spec(model_dir)
        self.vocab_size = self.spec.vocab_size
        self.model = load_whole(SafetensorsReader(model_dir), self.spec, torch.float32)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).float()

