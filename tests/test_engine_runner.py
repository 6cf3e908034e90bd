"""Tests of ``run.py --engine_dir`` (issue 5, item 3).

Without TensorRT-LLM, everything before the runtime is checked: the engine dir layout (``engine_layout`` below
writes a ``config.json`` and empty ``rank{N}.engine`` placeholders: enough for the layout checks, never run), the
tokenizer dir, the mpirun command for multi-GPU engines, and the request handed to ``ModelRunnerCpp``. The real
build + run of SmolLM2 is marked ``gpu`` / ``trtllm`` (reported NOT RUN here).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

import nasrt.deploy.engine.runner as runner_mod
from nasrt.arch import load_spec
from nasrt.cli import build_parser, main
from nasrt.convert import ConvertOptions, trtllm_config
from nasrt.errors import CheckpointError, ConfigError, MissingDependencyError
from nasrt.runtime.text import load_tokenizer

PROMPT = "What is the capital of France?"


def engine_layout(root: Path, model_dir: Path, tp: int = 1, ranks: int | None = None, **build) -> Path:
    """config.json like trtllm-build writes it + ``ranks`` empty rank files (layout checks only)."""
    spec = load_spec(model_dir)
    root.mkdir(parents=True)
    pretrained = trtllm_config(spec, ConvertOptions(tp_size=tp), "float16")
    build_config = {"max_batch_size": 2, "max_input_len": 128, "max_seq_len": 256, "max_beam_width": 1,
                    "max_num_tokens": 256, "plugin_config": {"gpt_attention_plugin": "auto"}, **build}
    (root / "config.json").write_text(json.dumps({"version": "1.2.1", "pretrained_config": pretrained,
                                                 "build_config": build_config}))
    for r in range(tp if ranks is None else ranks):
        (root / f"rank{r}.engine").write_bytes(b"")
    return root


def run_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``run`` flags with the real ``nasrt run`` parser."""
    return build_parser("run").parse_args(["run", *argv])




@pytest.fixture(scope="module")
def tokenizer(smollm2):
    return load_tokenizer(smollm2)


# ---- engine dir and tokenizer checks -------------------------------------------------------------------

def test_engine_dir_not_found(tmp_path):
    with pytest.raises(CheckpointError, match="directory not found"):
        runner_mod.validate_engine_dir(tmp_path / "nope")


def test_engine_dir_without_config(tmp_path):
    (tmp_path / "rank0.engine").write_bytes(b"")
    with pytest.raises(CheckpointError, match="config.json missing"):
        runner_mod.validate_engine_dir(tmp_path)


def test_checkpoint_dir_is_not_an_engine_dir(synthetic, tmp_path):
    from nasrt.convert import convert_checkpoint

    ckpt = convert_checkpoint(synthetic, tmp_path / "ckpt", ConvertOptions("bfloat16"), progress=False)
    with pytest.raises(CheckpointError, match="no 'pretrained_config' section"):
        runner_mod.validate_engine_dir(ckpt)


def test_engine_dir_missing_rank_files(smollm2, tmp_path, capsys):
    eng = engine_layout(tmp_path / "engine", smollm2, tp=3, ranks=1)
    with pytest.raises(CheckpointError, match=r"missing engine file\(s\) rank1.engine, rank2.engine .*world_size 3"):
        runner_mod.validate_engine_dir(eng)
    rc = main(["run", "--engine_dir", str(eng), "--tokenizer_dir", str(smollm2), "--input_text", PROMPT])
    err = capsys.readouterr().err
    assert rc == 2 and "nasrt run: error:" in err and "rank1.engine" in err


def test_tokenizer_dir_without_tokenizer_files(smollm2, tmp_path):
    eng = engine_layout(tmp_path / "engine", smollm2)
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    args = run_args(["--engine_dir", str(eng), "--tokenizer_dir", str(empty), "--input_text", PROMPT])
    with pytest.raises(ConfigError, match=rf"--tokenizer_dir {empty}: no tokenizer files"):
        runner_mod.run_engine(args)


def test_single_gpu_engine_without_trtllm(smollm2, tmp_path, no_trtllm):
    eng = engine_layout(tmp_path / "engine", smollm2)
    args = run_args(["--engine_dir", str(eng), "--tokenizer_dir", str(smollm2), "--input_text", PROMPT])
    with pytest.raises(MissingDependencyError, match=r"TensorRT-LLM 1.2.x .*tensorrt-llm==1.2.1"):
        runner_mod.run_engine(args)


# ---- multi-GPU: mpirun ---------------------------------------------------------------------------------

def test_multi_gpu_engine_prints_mpirun_command(smollm2, tmp_path, capsys, monkeypatch, no_trtllm):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        monkeypatch.delenv(var, raising=False)
    eng = engine_layout(tmp_path / "engine", smollm2, tp=3)
    argv = ["--engine_dir", str(eng), "--tokenizer_dir", str(smollm2), "--input_text", PROMPT, "second prompt",
            "--max_output_len", "12", "--top_k", "5", "--temperature", "0.7", "--stop_words", "Paris", ".",
            "--chat", "--no-streaming", "--use_py_session", "--seed", "3"]
    assert main(["run", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    cmd = shlex.split(lines[-1])
    assert cmd[:5] == ["mpirun", "-n", "3", "--allow-run-as-root", sys.executable]
    assert cmd[5] == str(runner_mod.REPO_RUN_PY) and Path(cmd[5]).name == "run.py"
    # every rank gets the same request back through the real run parser, without --launch
    forwarded, original = run_args(cmd[6:]), run_args(argv)
    for name in runner_mod.FORWARDED:
        assert getattr(forwarded, name) == getattr(original, name), name
    assert forwarded.launch is False and forwarded.streaming is False


def test_launch_needs_mpirun(smollm2, tmp_path, monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runner_mod.shutil, "which", lambda name, *a: None)
    eng = engine_layout(tmp_path / "engine", smollm2, tp=3)
    args = run_args(["--engine_dir", str(eng), "--tokenizer_dir", str(smollm2), "--input_text", PROMPT, "--launch"])
    with pytest.raises(MissingDependencyError, match="--launch needs mpirun"):
        runner_mod.run_engine(args)


# ---- the request handed to ModelRunnerCpp / ModelRunner -------------------------------------------------

def test_prepare_request_chat_end_ids_and_stop_words(smollm2, tmp_path, tokenizer):
    eng = engine_layout(tmp_path / "engine", smollm2)
    cfg = runner_mod.validate_engine_dir(eng)
    cfg["pretrained_config"]["eos_token_id"] = [2, 7]
    args = run_args(["--engine_dir", str(eng), "--tokenizer_dir", str(smollm2), "--input_text", PROMPT, "--chat",
                     "--stop_words", " Paris", "--max_output_len", "20", "--kv_cache_free_gpu_memory_fraction",
                     "0.5"])
    req = runner_mod.prepare_request(args, cfg, tokenizer)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                             add_generation_prompt=True)
    assert req.prompts == [tokenizer(rendered, add_special_tokens=False)["input_ids"]]
    assert req.texts == [PROMPT]
    g = req.generate_kwargs
    assert g["end_id"] == 2 and g["max_new_tokens"] == 20 and g["top_k"] == 1 and g["num_beams"] == 1
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    assert g["stop_words_list"] == [[[7], paris]]  # second EOS id + the stop word, per prompt
    assert g["pad_id"] == (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 2)
    assert g["streaming"] is True and g["return_dict"] and g["output_sequence_lengths"]
    r = req.runner_kwargs
    assert r == {"engine_dir": str(eng), "rank": 0, "max_output_len": 20, "max_batch_size": 1,
                 "max_input_len": len(req.prompts[0]), "max_beam_width": 1,
                 "kv_cache_free_gpu_memory_fraction": 0.5}
    py = runner_mod.prepare_request(run_args([*map(str, ["--engine_dir", eng, "--tokenizer_dir", smollm2,
                                                          "--input_text", "a", "b", "--use_py_session"])]),
                                    cfg, tokenizer)
    assert py.use_py_session and "max_batch_size" not in py.runner_kwargs and py.streaming is False


@pytest.mark.parametrize("extra,match", [
    (["--input_text", "a", "b", "c"], r"3 prompts exceed the engine's max_batch_size 2"),
    (["--input_text", "word " * 200], r"exceeds the engine's max_input_len 128"),
    (["--input_text", "hi", "--max_output_len", "300"], r"exceed the engine's max_seq_len 256"),
    (["--input_text", "hi", "--num_beams", "2"], r"--num_beams 2 exceeds the engine's max_beam_width 1"),
    (["--input_text", "hi", "--top_p", "1.5"], r"--top_p 1.5"),
])
def test_requests_beyond_engine_limits(smollm2, tmp_path, tokenizer, extra, match):
    eng = engine_layout(tmp_path / "engine", smollm2)
    cfg = runner_mod.validate_engine_dir(eng)
    args = run_args(["--engine_dir", str(eng), "--tokenizer_dir", str(smollm2), "--max_input_length", "1000",
                     *extra])
    with pytest.raises(ConfigError, match=match):
        runner_mod.prepare_request(args, cfg, tokenizer)


def test_print_outputs_slices_prompt_and_sequence_length(smollm2, tmp_path, tokenizer, capsys):
    eng = engine_layout(tmp_path / "engine", smollm2)
    cfg = runner_mod.validate_engine_dir(eng)
    args = run_args(["--engine_dir", str(eng), "--tokenizer_dir", str(smollm2), "--input_text", PROMPT, "Hi",
                     "--max_output_len", "16"])
    req = runner_mod.prepare_request(args, cfg, tokenizer)
    answers = [tokenizer(" Paris.", add_special_tokens=False)["input_ids"], tokenizer(" Hello", add_special_tokens=False)["input_ids"]]
    width = max(len(p) + len(a) for p, a in zip(req.prompts, answers, strict=True)) + 3
    ids = torch.full((2, 1, width), 2, dtype=torch.int32)  # padded with end ids past sequence_length
    lengths = torch.zeros((2, 1), dtype=torch.int32)
    for b, (p, a) in enumerate(zip(req.prompts, answers, strict=True)):
        ids[b, 0, :len(p) + len(a)] = torch.tensor(p + a)
        lengths[b, 0] = len(p) + len(a)
    assert runner_mod.print_outputs(req, {"output_ids": ids, "sequence_lengths": lengths}, tokenizer) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f'Input: "{PROMPT}"', 'Output: " Paris."', 'Input: "Hi"', 'Output: " Hello"']


# ---- real engine (GPU machine with TensorRT-LLM 1.2) ---------------------------------------------------

@pytest.mark.gpu
@pytest.mark.trtllm
@pytest.mark.parametrize("session", [[], ["--use_py_session"]])
def test_real_engine_answers_paris(smollm2, tmp_path_factory, capsys, session):
    from nasrt.convert import convert_checkpoint
    from nasrt.deploy.engine.build import build_engine

    root = tmp_path_factory.mktemp("smol-engine")
    ckpt = convert_checkpoint(smollm2, root / "ckpt", ConvertOptions("float16"), progress=False)
    profile = root / "build" / "smol.json"
    profile.parent.mkdir()
    profile.write_text(json.dumps({"gpu": "h100-80gb", "quantization": {"quant_algo": None,
                                   "kv_cache_quant_algo": None}, "tp_size": 1, "pp_size": 1,
                                   "max_batch_size": 2, "max_input_len": 512, "max_seq_len": 1024,
                                   "max_num_tokens": 1024, "kv_cache_type": "paged", "plugins": "bf16"}))
    eng = root / "engine"
    build_engine(ckpt, profile, eng)
    rc = main(["run", "--engine_dir", str(eng), "--tokenizer_dir", str(smollm2), "--input_text", PROMPT, "--chat",
               "--max_output_len", "20", *session])
    assert rc == 0 and "Paris" in capsys.readouterr().out


def test_run_py_with_standin_trtllm_140_stops_with_the_version_message(smollm2, tmp_path):
    """``run.py --engine_dir`` under a TensorRT-LLM release without the engine path: exit 2, one line, no traceback."""
    import os
    import subprocess

    from standins import write_trtllm_package

    site = write_trtllm_package(tmp_path / "site", "1.4.0")
    eng = engine_layout(tmp_path / "engine", smollm2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(runner_mod.REPO_RUN_PY), "--engine_dir", str(eng), "--tokenizer_dir",
                           str(smollm2), "--input_text", PROMPT], capture_output=True, text=True, env=env, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and err[-1].startswith("nasrt run: error:")
    assert "1.4.0 has no engine path" in err[-1] and "trtllm-serve" in err[-1]
