"""Acceptance tests of build profiles and ``nasrt build`` (issue 5, items 1-2).

The allowed trtllm-build 1.2 flags and values below are transcribed from shared/reference/trtllm-checkpoint-format.md
section 7 (plugin dtype choices as in TensorRT-LLM 1.2's ``PluginConfig``), independently of ``nasrt.deploy.profiles``.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import nasrt.deploy.engine
import nasrt.deploy.engine.build as build_mod
from nasrt.arch import from_hf_config
from nasrt.cli import main
from nasrt.convert import ConvertOptions, convert_checkpoint, trtllm_config, write_rank
from nasrt.deploy.plan import PlanRequest, plan_memory
from nasrt.deploy.profiles import (
    PROFILE_DIR,
    list_profiles,
    load_plugin_preset,
    load_profile,
    trtllm_build_argv,
)
from nasrt.errors import CheckpointError, ConfigError, MissingDependencyError
from nasrt.fixtures import write_config_only
from nasrt.fp8 import quantize, scale_from_amax
from nasrt.st_io import DictReader, SafetensorsReader
from nasrt.tensor_map import ACT_SCALE, WEIGHT_SCALE, layer_rules

ONOFF = {"enable", "disable"}
DT = {"float16", "bfloat16", "float32"}
#: trtllm-build 1.2 flag -> allowed values (None = positive integer; "path" = a directory).
REFERENCE_FLAGS: dict[str, set[str] | None | str] = {
    "checkpoint_dir": "path", "output_dir": "path",
    "max_batch_size": None, "max_input_len": None, "max_seq_len": None, "max_num_tokens": None,
    "opt_num_tokens": None, "max_beam_width": None, "tokens_per_block": None, "workers": None,
    "kv_cache_type": {"continuous", "paged", "disabled"},
    "gemm_plugin": DT | {"auto", "fp8", "disable"},
    "gpt_attention_plugin": DT | {"auto", "disable"},
    "remove_input_padding": ONOFF, "context_fmha": ONOFF, "use_paged_context_fmha": ONOFF,
    "use_fp8_context_fmha": ONOFF, "use_fused_mlp": ONOFF, "reduce_fusion": ONOFF, "multiple_profiles": ONOFF,
    "logits_dtype": {"float16", "float32"},
}
SHIPPED = ("h100x1-fp8", "h100x2-bf16", "a100x2-bf16")


def parse_argv(argv: list[str]) -> dict[str, str]:
    assert argv[0] == "trtllm-build"
    rest, out = argv[1:], {}
    while rest:
        flag = rest.pop(0)
        assert flag.startswith("--"), flag
        assert rest and not rest[0].startswith("--"), f"{flag} has no value"
        assert flag[2:] not in out, f"{flag} given twice"
        out[flag[2:]] = rest.pop(0)
    return out


# ---- checkpoints ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, request) -> dict[str, Path]:
    """BF16 tp1, BF16 tp2 and FP8 (+ FP8 KV) tp1 checkpoints of the synthetic all-variants model."""
    synthetic = request.getfixturevalue("synthetic")
    root = tmp_path_factory.mktemp("ckpts")
    out = {
        "bf16": convert_checkpoint(synthetic, root / "bf16", ConvertOptions("bfloat16"), progress=False),
        "bf16-tp2": convert_checkpoint(synthetic, root / "bf16-tp2", ConvertOptions("bfloat16", 2), progress=False),
    }
    out["fp8"] = write_fp8_checkpoint(synthetic, root / "fp8")
    return out


def write_fp8_checkpoint(hf_dir: Path, out: Path) -> Path:
    """A per-tensor FP8 checkpoint (weights float8, amax/448 scales, KV scale 1) written with the converter."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    spec = from_hf_config(cfg)
    reader = SafetensorsReader(hf_dir)
    tensors = {n: reader.get(n) for n in reader.names()}
    scales, kv_scales = {}, {}
    for glob, layer in enumerate(spec.layers):
        for rule in layer_rules(layer):
            if rule.linear:
                srcs = rule.hf_names(glob)
                sc = scale_from_amax(max(float(tensors[s].float().abs().max()) for s in srcs))
                for s in srcs:
                    tensors[s] = quantize(tensors[s], sc)
                scales[(glob, rule.linear)] = {WEIGHT_SCALE: sc, ACT_SCALE: torch.tensor([0.02])}
        if layer.has_kv_cache:
            kv_scales[glob] = torch.tensor([1.0])
    opts = ConvertOptions("bfloat16")
    quant = {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}
    out.mkdir(parents=True)
    cfg_out = trtllm_config(spec, opts, "bfloat16", {**trtllm_config(spec, opts, "bfloat16")["quantization"],
                                                      **quant})
    (out / "config.json").write_text(json.dumps(cfg_out))
    write_rank(DictReader(tensors), spec, opts, "bfloat16", 0, out, scales, kv_scales, progress=False)
    return out




def write_profile(tmp_path: Path, name: str, **changes) -> Path:
    data = json.loads((PROFILE_DIR / "h100x2-bf16.json").read_text())
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None and k != "quantization"]:
        data.pop(key)
    path = tmp_path / "build" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


# ---- profiles ------------------------------------------------------------------------------------------

def test_shipped_profiles_present():
    assert set(SHIPPED) <= set(list_profiles())


@pytest.mark.parametrize("name", SHIPPED)
def test_profile_argv_uses_only_trtllm_build_12_flags(name):
    prof = load_profile(name)
    argv = trtllm_build_argv(prof, "/ckpt", "/engine")
    flags = parse_argv(argv)
    for flag, value in flags.items():
        assert flag in REFERENCE_FLAGS, f"{name}: --{flag} is not a trtllm-build 1.2 flag"
        allowed = REFERENCE_FLAGS[flag]
        if allowed is None:
            assert value.isdigit() and int(value) >= 1, f"{name}: --{flag} {value}"
        elif allowed != "path":
            assert value in allowed, f"{name}: --{flag} {value} not in {sorted(allowed)}"
    assert flags["checkpoint_dir"] == "/ckpt" and flags["output_dir"] == "/engine"
    # always explicit (the default would be 131072), paged KV, the plugin preset's fields
    for key in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens"):
        assert key in flags
    assert int(flags["max_input_len"]) <= int(flags["max_seq_len"]) < 131072
    assert flags["kv_cache_type"] == "paged"
    for key in ("gemm_plugin", "gpt_attention_plugin", "context_fmha", "use_fp8_context_fmha",
                "use_paged_context_fmha", "use_fused_mlp", "remove_input_padding"):
        assert key in flags, f"{name}: preset lacks --{key}"
    assert flags["gpt_attention_plugin"] != "disable" and flags["remove_input_padding"] == "enable"  # IFB
    fp8 = prof.quant_algo == "FP8"
    assert flags["use_fp8_context_fmha"] == ("enable" if fp8 else "disable")


def test_profile_targets():
    fp8 = load_profile("h100x1-fp8")
    assert (fp8.gpu, fp8.tp_size, fp8.pp_size, fp8.quant_algo, fp8.kv_cache_quant_algo) == \
        ("h100-80gb", 1, 1, "FP8", "FP8")
    for name, gpu in (("h100x2-bf16", "h100-80gb"), ("a100x2-bf16", "a100-80gb")):
        p = load_profile(name)
        assert (p.gpu, p.tp_size, p.pp_size, p.quant_algo, p.kv_cache_quant_algo) == (gpu, 2, 1, None, None)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_fit_the_51b(tmp_path, name):
    """Each profile's batch x sequence fits its GPU for the full-size 51B, according to the planner."""
    from nasrt.arch import load_spec

    prof = load_profile(name)
    spec = load_spec(write_config_only("nemotron-51b", tmp_path / "51b"))
    req = PlanRequest(gpu=prof.gpu, tp=prof.tp_size, pp=prof.pp_size,
                      dtype="fp8" if prof.quant_algo == "FP8" else "bfloat16",
                      kv_cache_dtype="fp8" if prof.kv_cache_quant_algo == "FP8" else "bfloat16",
                      batch=prof.max_batch_size, seq=prof.max_seq_len, max_num_tokens=prof.max_num_tokens)
    plan = plan_memory(spec, req)
    assert plan.fits, plan.reason
    assert plan.max_batch >= prof.max_batch_size


@pytest.mark.parametrize("field,value,match", [
    ("max_batch_sizee", 8, r"field 'max_batch_sizee' .*did you mean 'max_batch_size'"),
    ("kv_cache_type", "pagd", r"field 'kv_cache_type' = 'pagd' is not accepted .*paged"),
    ("max_num_tokens", "8192", r"field 'max_num_tokens' = '8192' must be an integer"),
    ("max_seq_len", None, r"missing required field\(s\) \['max_seq_len'\]"),
    ("gpu", "h100", r"field 'gpu' = 'h100'"),
    ("quantization", {"quant_algo": "INT8"}, r"quantization.quant_algo' = 'INT8'"),
    ("plugins", "nope", r"field 'plugins': plugin preset 'nope' not found"),
    ("max_input_len", 9000, r"'max_input_len' = 9000 exceeds max_seq_len"),
])
def test_bad_profile_field_is_named(tmp_path, field, value, match):
    path = write_profile(tmp_path, "bad", **{field: value})
    with pytest.raises(ConfigError, match=match) as info:
        load_profile(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("field,value,match", [
    ("gemm_plugin", "bf16", r"field 'gemm_plugin' = 'bf16' is not accepted"),
    ("use_fused_mlps", "enable", r"field 'use_fused_mlps' .*did you mean 'use_fused_mlp'"),
    ("context_fmha", True, r"field 'context_fmha' = True is not accepted .*enable, disable"),
])
def test_bad_plugin_preset_field_is_named(tmp_path, field, value, match):
    preset = json.loads((Path(PROFILE_DIR).parent / "plugins" / "bf16.json").read_text())
    preset[field] = value
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "broken.json").write_text(json.dumps(preset))
    with pytest.raises(ConfigError, match=match) as info:
        load_plugin_preset(tmp_path / "plugins" / "broken.json")
    assert "broken.json" in str(info.value)
    # through a profile in the same tree, the profile file is named too
    path = write_profile(tmp_path, "uses-broken", plugins="broken")
    with pytest.raises(ConfigError, match=match) as info:
        load_profile(path)
    assert str(path) in str(info.value) and "broken.json" in str(info.value)


def test_fp8_profile_on_gpu_without_fp8_is_rejected(tmp_path):
    path = write_profile(tmp_path, "a100-fp8", gpu="a100-80gb", plugins="fp8", tp_size=1,
                         quantization={"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"})
    with pytest.raises(ConfigError, match="compute capability >= 8.9"):
        load_profile(path)


def test_user_adds_a_profile_by_adding_a_file(tmp_path, ckpts):
    path = write_profile(tmp_path, "l40s-small", gpu="l40s-48gb", max_batch_size=4, max_seq_len=2048,
                         max_input_len=1024, max_num_tokens=2048)
    prof = load_profile(path)
    assert prof.name == "l40s-small" and prof.plugin_preset == "bf16"
    res = build_mod.build_engine(ckpts["bf16-tp2"], path, tmp_path / "engine", dry_run=True)
    assert parse_argv(res.argv)["max_seq_len"] == "2048"


def test_planner_fp8_weight_bytes_equal_fp8_rank_file(ckpts):
    """FP8 linears at 1 byte + two float32 scales each, KV scale per attention layer, 16-bit embedding/lm_head."""
    from nasrt.arch import load_spec
    from nasrt.deploy.plan import request_defaults

    d = request_defaults(ckpts["fp8"])
    assert (d["dtype"], d["kv_cache_dtype"]) == ("fp8", "fp8")
    plan = plan_memory(load_spec(ckpts["fp8"]), PlanRequest(gpu="l4-24gb", dtype="fp8", kv_cache_dtype="fp8"))
    raw = (ckpts["fp8"] / "rank0.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    file_bytes = sum(t["data_offsets"][1] - t["data_offsets"][0] for k, t in header.items() if k != "__metadata__")
    assert sum(t["dtype"] == "F8_E4M3" for t in header.values() if isinstance(t, dict) and "dtype" in t) > 0
    assert plan.ranks[0].weight_bytes == file_bytes


# ---- nasrt build ---------------------------------------------------------------------------------------

def test_dry_run_prints_command_and_writes_nothing(ckpts, tmp_path, capsys, no_trtllm):
    out = tmp_path / "engine"
    rc = main(["build", "--checkpoint_dir", str(ckpts["fp8"]), "--profile", "h100x1-fp8", "--output_dir",
               str(out), "--dry-run"])
    text = capsys.readouterr().out
    assert rc == 0
    want = shlex.join(trtllm_build_argv(load_profile("h100x1-fp8"), ckpts["fp8"], out))
    assert want in text.splitlines()
    assert "verdict: FITS" in text and "weights fp8, KV cache fp8" in text
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_fp8_profile_with_bf16_checkpoint(ckpts, tmp_path):
    with pytest.raises(CheckpointError, match=r"needs quantization.quant_algo = \"FP8\" .* has null") as info:
        build_mod.build_engine(ckpts["bf16"], "h100x1-fp8", tmp_path / "e", dry_run=True)
    assert "h100x1-fp8" in str(info.value) and str(ckpts["bf16"] / "config.json") in str(info.value)


def test_bf16_profile_with_fp8_checkpoint(ckpts, tmp_path):
    with pytest.raises(CheckpointError, match=r"needs quantization.quant_algo = null .* has \"FP8\""):
        build_mod.build_engine(ckpts["fp8"], "h100x2-bf16", tmp_path / "e", dry_run=True)


def test_tp2_profile_with_tp1_checkpoint(ckpts, tmp_path, capsys):
    rc = main(["build", "--checkpoint_dir", str(ckpts["bf16"]), "--profile", "h100x2-bf16", "--output_dir",
               str(tmp_path / "e"), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "nasrt build: error:" in err and "tp 2 x pp 1 = world size 2" in err and "tp 1 x pp 1" in err


def test_checkpoint_missing_rank_file(ckpts, tmp_path):
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpts["bf16-tp2"], broken)
    (broken / "rank1.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing rank file\(s\) \['rank1.safetensors'\]"):
        build_mod.build_engine(broken, "h100x2-bf16", tmp_path / "e", dry_run=True)


def test_hf_dir_is_not_a_checkpoint(synthetic, tmp_path):
    with pytest.raises(CheckpointError, match="not a TensorRT-LLM checkpoint.*nasrt convert"):
        build_mod.build_engine(synthetic, "h100x2-bf16", tmp_path / "e", dry_run=True)


def test_profile_that_does_not_fit_is_refused_unless_forced(ckpts, tmp_path, capsys, no_trtllm):
    path = write_profile(tmp_path, "huge", gpu="l4-24gb", max_batch_size=4096, max_seq_len=1048576,
                         max_input_len=1024)
    out = tmp_path / "engine"
    with pytest.raises(ConfigError, match=r"does not fit according to the planner: the KV cache holds .*--force"):
        build_mod.build_engine(ckpts["bf16-tp2"], path, out, dry_run=True)
    rc = main(["build", "--checkpoint_dir", str(ckpts["bf16-tp2"]), "--profile", str(path), "--output_dir",
               str(out), "--dry-run"])
    assert rc == 2 and "--force" in capsys.readouterr().err
    res = build_mod.build_engine(ckpts["bf16-tp2"], path, out, dry_run=True, force=True)
    assert not res.plan.fits and parse_argv(res.argv)["max_batch_size"] == "4096"
    # forced past the planner, a real build still stops at the missing TensorRT-LLM
    with pytest.raises(MissingDependencyError):
        build_mod.build_engine(ckpts["bf16-tp2"], path, out, force=True)
    assert not out.exists()


def test_build_without_trtllm_stops_and_writes_nothing(ckpts, tmp_path, capsys, no_trtllm):
    out = tmp_path / "engines" / "e"
    with pytest.raises(MissingDependencyError) as info:
        build_mod.build_engine(ckpts["fp8"], "h100x1-fp8", out)
    msg = str(info.value)
    assert "TensorRT-LLM 1.2.x" in msg and "tensorrt-llm==1.2.1" in msg and "NGC" in msg and "NVIDIA's package index" in msg
    assert "h100-80gb" in msg and "trtllm-build is not on PATH" in msg
    assert not out.exists() and not out.parent.exists()
    rc = main(["build", "--checkpoint_dir", str(ckpts["fp8"]), "--profile", "h100x1-fp8", "--output_dir", str(out)])
    assert rc == 2 and "needs TensorRT-LLM 1.2.x" in capsys.readouterr().err
    assert not out.parent.exists()


def test_wrong_trtllm_version_is_refused(monkeypatch):
    monkeypatch.setattr(nasrt.deploy.engine, "trtllm_version", lambda: "1.3.0rc23")
    monkeypatch.setattr(nasrt.deploy.engine.shutil, "which", lambda name, *a: "/usr/bin/" + name)
    with pytest.raises(MissingDependencyError, match="1.3.0rc23 has no engine path.*nasrt serve-config"):
        nasrt.deploy.engine.require_trtllm("nasrt build", "1 x h100-80gb", need_cli=True)


def test_existing_output_dir_is_refused(ckpts, tmp_path, no_trtllm):
    out = tmp_path / "engine"
    out.mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        build_mod.build_engine(ckpts["fp8"], "h100x1-fp8", out)


# ---- real build (GPU machine with TensorRT-LLM 1.2) ----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.trtllm
def test_real_build_records_profile_and_version(ckpts, tmp_path):
    path = write_profile(tmp_path, "tiny-bf16", tp_size=1, max_batch_size=2, max_seq_len=256, max_input_len=128,
                         max_num_tokens=256, gpu="h100-80gb")
    out = tmp_path / "engine"
    res = build_mod.build_engine(ckpts["bf16"], path, out)
    assert res.built and (out / "rank0.engine").is_file()
    record = json.loads((out / build_mod.RECORD_NAME).read_text())
    import nasrt as pkg

    assert record["nasrt_version"] == pkg.__version__ and record["profile"]["name"] == "tiny-bf16"
    assert record["tensorrt_llm_version"].startswith("1.2")
    built = json.loads((out / "config.json").read_text())["build_config"]
    assert built["max_seq_len"] == 256 and built["max_batch_size"] == 2


# ---- issue 8: nasrt check first, output dir rules, trtllm-build's cwd, combinations, version fence ------------

def test_dry_run_with_mapping_defect_fails_before_printing_a_command(ckpts, tmp_path, capsys):
    bad = tmp_path / "ckpt"
    shutil.copytree(ckpts["bf16-tp2"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["mapping"].update(auto_parallel=False, attn_tp_size=1, attn_cp_size=1)
    (bad / "config.json").write_text(json.dumps(cfg))
    rc = main(["build", "--checkpoint_dir", str(bad), "--profile", "h100x2-bf16", "--output_dir",
               str(tmp_path / "e"), "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 2 and "trtllm-build" not in captured.out and "dry run" not in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nasrt build: error:")
    assert "mapping.auto_parallel" in err[0] and "mapping.attn_tp_size" in err[0]


def test_dry_run_refuses_existing_output_dir(ckpts, tmp_path, capsys):
    out = tmp_path / "engine"
    out.mkdir()
    argv = ["build", "--checkpoint_dir", str(ckpts["fp8"]), "--profile", "h100x1-fp8", "--output_dir", str(out),
            "--dry-run"]
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize("inside", [".", "engine", "sub/engine"])
def test_output_dir_in_checkpoint_dir_is_refused(ckpts, tmp_path, inside):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(ckpts["fp8"], ckpt)
    with pytest.raises(ConfigError, match=r"--output_dir .* (is the|is inside the) --checkpoint_dir"):
        build_mod.build_engine(ckpt, "h100x1-fp8", ckpt / inside, dry_run=True, overwrite=True)
    with pytest.raises(ConfigError, match=r"--checkpoint_dir .* is inside --output_dir"):
        build_mod.build_engine(ckpt, "h100x1-fp8", tmp_path, dry_run=True, overwrite=True)


@pytest.mark.parametrize("changes,match", [
    ({"multiple_profiles": "enable", "opt_num_tokens": 1024}, r"'opt_num_tokens' is ignored .*multiple_profiles"),
    ({"gather_generation_logits": True}, r"'gather_generation_logits' = True: deprecated"),
    ({"reduce_fusion": "enable"}, r"'reduce_fusion' = 'enable': .*always off for DeciLM"),
    ({"quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None}, "plugins": "fp8", "tp_size": 1},
     r"use_fp8_context_fmha with use_paged_context_fmha needs an FP8 KV cache"),
])
def test_profile_combinations_trtllm_build_refuses(tmp_path, changes, match):
    path = write_profile(tmp_path, "combo", **changes)
    with pytest.raises(ConfigError, match=match) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_build_with_standin_trtllm_build_leaves_nothing_outside(ckpts, tmp_path, monkeypatch):
    """trtllm-build runs inside the temporary output dir: its model.cache lands in the engine dir, not the cwd."""
    from standins import write_trtllm_build, write_trtllm_package

    from nasrt.deploy.check import check_dir

    monkeypatch.syspath_prepend(str(write_trtllm_package(tmp_path / "site", "1.2.1")))
    write_trtllm_build(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{__import__('os').environ['PATH']}")
    monkeypatch.setattr(build_mod, "check_gpus", lambda profile: None)  # the one thing a CPU cannot stand in for
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "engines" / "e"
    res = build_mod.build_engine(ckpts["fp8"], "h100x1-fp8", out)
    assert res.built and res.record["tensorrt_llm_version"] == "1.2.1"
    new = {p for p in tmp_path.rglob("*")} - before
    outside = sorted(str(p) for p in new if p != out.parent and out not in p.parents and p != out)
    assert outside == [] and list(work.iterdir()) == []
    assert (out / "model.cache").is_file() and (out / "rank0.engine").is_file()
    record = json.loads((out / "standin_record.json").read_text())
    cwd = Path(record["cwd"])
    assert cwd.parent == out.parent and cwd != out and not cwd.exists()  # the temporary sibling, renamed to out
    assert record["argv"][1:] == trtllm_build_argv(load_profile("h100x1-fp8"), ckpts["fp8"], cwd)[1:]
    assert check_dir(out).ok


def test_version_fence_with_standin_trtllm_140(ckpts, tmp_path, monkeypatch, capsys):
    from standins import write_trtllm_package

    monkeypatch.syspath_prepend(str(write_trtllm_package(tmp_path / "site", "1.4.0")))
    assert nasrt.deploy.engine.trtllm_version() == "1.4.0"
    out = tmp_path / "e"
    rc = main(["build", "--checkpoint_dir", str(ckpts["fp8"]), "--profile", "h100x1-fp8", "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("nasrt build: error:")
    assert "1.4.0 has no engine path" in err[0] and "trtllm-serve" in err[0] and "nasrt serve-config" in err[0]
    assert not out.exists()


def test_version_read_without_metadata_or_import(tmp_path, monkeypatch):
    """Without dist-info the version comes from the package's ``__version__`` line, read as text."""
    from standins import write_trtllm_package

    root = write_trtllm_package(tmp_path / "site", "1.3.0rc23")
    shutil.rmtree(root / "tensorrt_llm-1.3.0rc23.dist-info")
    monkeypatch.syspath_prepend(str(root))
    assert nasrt.deploy.engine.trtllm_version() == "1.3.0rc23"
    with pytest.raises(MissingDependencyError, match="1.3.0rc23 has no engine path"):
        nasrt.deploy.engine.check_engine_path("nasrt build")


@pytest.mark.parametrize("version,ok", [("1.2.0rc8", True), ("1.2.1", True), ("1.3.0rc20", True),
                                        ("1.3.0rc21", False), ("1.3.0", False), ("1.4.0", False), ("2.0.0", False)])
def test_engine_path_releases(version, ok):
    assert nasrt.deploy.engine.has_engine_path(version) is ok
