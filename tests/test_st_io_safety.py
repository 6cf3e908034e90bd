"""Weight files as an attacker of the inputs would make them (issue 12 §3, §4, §5; issue 8 §6b pickle path):
integer weights, FIFOs, indexes that are not objects or point outside the model dir, symlinks out of it, a config
whose layer count would mean unbounded work, a pickle-only dir for whole-model quantize. Each is refused with exit 2
and one ``nasrt <command>: error:`` line naming the tensor / file / key, nothing written, inputs unchanged."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nasrt.cli import main
from nasrt.st_io import SafetensorsReader

INDEX = "model.safetensors.index.json"
SHARD = "model-00001-of-00003.safetensors"


def tree_digest(d: Path) -> dict[str, str]:
    """sha256 of every regular file under ``d`` (symlinks and FIFOs by their target name only)."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(d))] = "-> " + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def refused(capsys, args: list[str], out: Path, inputs: list[Path], *needles: str) -> str:
    before = [tree_digest(d) for d in inputs]
    rc = main(args)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"nasrt {args[0]}: error: "), lines[0]
    assert "Traceback" not in captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    assert [tree_digest(d) for d in inputs] == before
    return lines[0]


def convert_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["convert", "--model_dir", str(model), "--output_dir", str(out), *extra]


def _index(model: Path) -> dict:
    return json.loads((model / INDEX).read_text())


def _write_index(model: Path, data) -> None:
    (model / INDEX).write_text(json.dumps(data))


# ---- the index (issue 12 §5) -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("damage", "needle"), [
    ("index_list", "must hold a JSON object, got list"),
    ("weight_map_list", "'weight_map' must be a JSON object"),
    ("value_int", "= 3 must be a file name"),
    ("value_null", "= None must be a file name"),
    ("absolute", "points outside the model directory"),
    ("dotdot", "points outside the model directory"),
    ("directory", "not a regular file"),
])
def test_bad_index_refused(damage, needle, synthetic_copy, tmp_path, capsys):
    model, idx = synthetic_copy, _index(synthetic_copy)
    name = "model.embed_tokens.weight"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if damage == "index_list":
        _write_index(model, [idx])
    elif damage == "weight_map_list":
        _write_index(model, {"weight_map": list(idx["weight_map"].items())})
    elif damage == "value_int":
        idx["weight_map"][name] = 3
        _write_index(model, idx)
    elif damage == "value_null":
        idx["weight_map"][name] = None
        _write_index(model, idx)
    elif damage == "absolute":
        target = elsewhere / idx["weight_map"][name]
        target.write_bytes((model / idx["weight_map"][name]).read_bytes())
        idx["weight_map"][name] = str(target)
        _write_index(model, idx)
    elif damage == "dotdot":
        (elsewhere / "w.safetensors").write_bytes((model / idx["weight_map"][name]).read_bytes())
        idx["weight_map"][name] = "../elsewhere/w.safetensors"
        _write_index(model, idx)
    elif damage == "directory":
        (model / "sub.safetensors").mkdir()
        idx["weight_map"][name] = "sub.safetensors"
        _write_index(model, idx)
    out = tmp_path / "ck"
    line = refused(capsys, convert_args(model, out), out, [model, elsewhere], needle)
    assert INDEX in line or "sub.safetensors" in line


# ---- symlinks out of the model dir (issue 12 §5) -----------------------------------------------------------------

def test_symlink_outside_refused_unless_allowed(synthetic_copy, tmp_path, capsys):
    model = synthetic_copy
    outside = tmp_path / "outside"
    outside.mkdir()
    (model / SHARD).rename(outside / SHARD)
    (model / SHARD).symlink_to(outside / SHARD)
    out = tmp_path / "ck"
    refused(capsys, convert_args(model, out), out, [model, outside], SHARD, "outside the model directory",
            "--allow_external_files")
    assert main(convert_args(model, out, "--allow_external_files")) == 0
    assert (out / "rank0.safetensors").is_file()


def test_symlink_inside_accepted(synthetic_copy, tmp_path):
    model = synthetic_copy
    (model / "blobs").mkdir()
    (model / SHARD).rename(model / "blobs" / SHARD)
    (model / SHARD).symlink_to(Path("blobs") / SHARD)
    assert main(convert_args(model, tmp_path / "ck")) == 0


def test_hf_cache_snapshot_layout_accepted(synthetic, tmp_path):
    """``snapshots/<rev>/file -> ../../blobs/<hash>`` (the Hugging Face hub cache) is not 'outside'."""
    repo = tmp_path / "models--x--y"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in synthetic.iterdir():
        (blobs / f"h-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"h-{f.name}")
    assert SafetensorsReader(snap).names()


# ---- tensors: only floating dtypes are weights (issue 12 §3) ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.uint8, torch.bool])
def test_integer_weight_refused(dtype, synthetic_copy, tmp_path, capsys):
    model = synthetic_copy
    name = "model.embed_tokens.weight"
    shard = model / _index(model)["weight_map"][name]
    reader = SafetensorsReader(model)
    tensors = {n: reader.get(n) for n in reader.names() if reader._file_of[n] == shard}
    reader.close()
    tensors[name] = torch.ones(tensors[name].shape, dtype=dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    out = tmp_path / "ck"
    refused(capsys, convert_args(model, out), out, [model], repr(name), "weights must be floating point")


# ---- unbounded work (issue 12 §4) ---------------------------------------------------------------------------------

def _child(code: str, timeout: float) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run ``code`` in a fresh interpreter; (result, seconds, peak RSS in KiB of the children so far)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def test_fifo_weight_file_does_not_hang(tmp_path):
    """A FIFO named model.safetensors: refused as not a regular file instead of blocking forever."""
    model = tmp_path / "m"
    model.mkdir()
    cfg = json.loads(json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 8,
                                 "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 300}))
    (model / "config.json").write_text(json.dumps(cfg))
    os.mkfifo(model / "model.safetensors")
    code = ("import sys; from nasrt.cli import main; "
            f"sys.exit(main(['convert', '--model_dir', {str(model)!r}, '--output_dir', {str(tmp_path / 'ck')!r}]))")
    proc, seconds, _ = _child(code, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("nasrt convert: error: ")
    assert "model.safetensors: not a regular file" in lines[0]
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("layers", [10**9, 5000])
def test_huge_layer_count_fails_fast_in_bounded_memory(layers, synthetic_copy, tmp_path):
    """num_hidden_layers far beyond the tensors present: refused in seconds, without memory growth."""
    cfg = json.loads((synthetic_copy / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    cfg["block_configs"] = cfg["block_configs"] * (layers // 8 if layers < 10**6 else 1)
    (synthetic_copy / "config.json").write_text(json.dumps(cfg))
    # VmHWM is this process's own peak RSS; ru_maxrss would include the parent's (subprocess spawns by vfork + exec,
    # and Linux carries the pre-exec high-water mark into ru_maxrss), so a big pytest parent would fail this test.
    code = ("import sys; from nasrt.cli import main; "
            f"rc = main(['convert', '--model_dir', {str(synthetic_copy)!r}, '--output_dir', "
            f"{str(tmp_path / 'ck')!r}]); "
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0].split()[1]; "
            "print(hwm, file=sys.stderr); sys.exit(rc)")
    proc, seconds, _ = _child(code, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert err[0].startswith("nasrt convert: error: ") and "num_hidden_layers" in err[0]
    assert int(err[-1]) < 1_500_000  # KiB: the interpreter with torch imported, nothing proportional to layers
    assert seconds < 90
    assert not (tmp_path / "ck").exists()


# ---- whole-model quantize of a pickle-only dir (issue 8 §6b) -------------------------------------------------------

def _no_unpickling(monkeypatch):
    calls = []

    def trap(*args, **kwargs):
        calls.append(args)
        raise AssertionError("unpickling code ran")

    monkeypatch.setattr(torch, "load", trap)
    monkeypatch.setattr(pickle, "load", trap)
    monkeypatch.setattr(pickle, "loads", trap)
    return calls


@pytest.mark.parametrize("model_type", ["llama", "nemotron-nas"])
def test_whole_model_quantize_refuses_pickle_only_dir(model_type, synthetic, tmp_path, capsys, monkeypatch):
    model = tmp_path / "m"
    model.mkdir()
    cfg = json.loads((synthetic / "config.json").read_text())
    if model_type == "llama":
        cfg = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
               "num_hidden_layers": 1, "intermediate_size": 128, "vocab_size": 1003, "torch_dtype": "bfloat16"}
    (model / "config.json").write_text(json.dumps(cfg))
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, model / "pytorch_model.bin")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (model / f).write_text("{}")
    calls = _no_unpickling(monkeypatch)
    out = tmp_path / "o"
    refused(capsys, ["quantize", "--model_dir", str(model), "--output_dir", str(out), "--whole_model"], out, [model],
            "pytorch_model.bin", "pickle")
    assert calls == []


def test_rank_file_symlink_outside_refused_unless_allowed(synthetic, tmp_path, capsys):
    """run / eval read checkpoint rank files under the same rule (--allow_external_files)."""
    from nasrt.quantize.tiny_tokenizer import write_tiny_tokenizer

    ck, outside, tok = tmp_path / "ck", tmp_path / "outside", tmp_path / "tok"
    assert main(convert_args(synthetic, ck)) == 0
    outside.mkdir()
    (ck / "rank0.safetensors").rename(outside / "rank0.safetensors")
    (ck / "rank0.safetensors").symlink_to(outside / "rank0.safetensors")
    write_tiny_tokenizer(tok, 1003)
    capsys.readouterr()
    args = ["eval", "perplexity", "--checkpoint_dir", str(ck), "--tokenizer_dir", str(tok), "--max_chars", "200",
            "--max_seq_len", "32"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nasrt eval: error: ") and "rank0.safetensors" in err[0]
    assert "--allow_external_files" in err[0]
    assert main([*args, "--allow_external_files"]) == 0
    assert "perplexity" in capsys.readouterr().out
    run = ["run", "--checkpoint_dir", str(ck), "--tokenizer_dir", str(tok), "--input_text", "hi",
           "--max_output_len", "2", "--no-streaming"]
    assert main(run) == 2
    assert "outside the model directory" in capsys.readouterr().err
    assert main([*run, "--allow_external_files"]) == 0
