"""Issue 12 (defects 1, 2, 6, 8) and issue 8 §6b flags: nothing a user owns is overwritten, interrupted work leaves
nothing (or names its debris), wrong flag values are refused by name before any work. The kill tests of real runs
are in ``test_signals.py``."""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nasrt import atomic
from nasrt.arch import load_spec
from nasrt.atomic import (
    atomic_output_dir,
    atomic_output_file,
    check_output_file,
    write_text_atomic,
)
from nasrt.cli import COMMANDS, Terminated, build_parser, main, terminate_like_interrupt
from nasrt.convert import ConvertOptions, convert_checkpoint
from nasrt.errors import NasrtError, OutputExistsError
from nasrt.quantize.tiny_tokenizer import write_tiny_tokenizer
from nasrt.runtime import SamplingConfig, generate, load_model
from nasrt.runtime.stop import TextStops, find_stop

PNG = b"\x89PNG\r\n\x1a\n"


# ---- helpers --------------------------------------------------------------------------------------------------

def tree_hash(*roots: Path) -> dict[str, str]:
    """sha256 of every file, and every directory's listing, under ``roots`` (a file root: that file)."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else [root, *sorted(root.rglob("*"))]
        for p in paths:
            key = str(p)
            if p.is_dir():
                out[key] = "dir:" + ",".join(sorted(c.name for c in p.iterdir()))
            else:
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 22), b""):
                        h.update(chunk)
                out[key] = h.hexdigest()
    return out


def one_error(err: str, command: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("[nasrt]")]
    assert len(lines) == 1 and lines[0].startswith(f"nasrt {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- shared models -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_tok(synthetic, tmp_path_factory) -> Path:
    """The all-variants HF model with a tokenizer (quantize and Triton need one)."""
    d = tmp_path_factory.mktemp("rel_hf") / "hf"
    shutil.copytree(synthetic, d)
    write_tiny_tokenizer(d, load_spec(d).vocab_size)
    return d


@pytest.fixture(scope="module")
def ckpt(hf_tok, tmp_path_factory) -> Path:
    return convert_checkpoint(hf_tok, tmp_path_factory.mktemp("rel_ck") / "ckpt", ConvertOptions("bfloat16"),
                              progress=False)


# ---- defect 1: files written outside an atomic output dir -------------------------------------------------------

def test_plan_plot_never_replaces_an_input(synthetic_copy, capsys):
    """``plan --model DIR --plot DIR/config.json`` replaced the model's config.json with a PNG (exit 0)."""
    before = tree_hash(synthetic_copy)
    for extra in ([], ["--overwrite"]):
        rc = main(["plan", "--model", str(synthetic_copy), "--plot", str(synthetic_copy / "config.json"), *extra])
        line = one_error(capsys.readouterr().err, "plan")
        assert rc == 2 and "--plot" in line and "overlaps the input" in line
    # a config.json given as --model is an input too
    cfg = synthetic_copy / "config.json"
    assert main(["plan", "--model", str(cfg), "--plot", str(cfg), "--overwrite"]) == 2
    assert "overlaps the input" in one_error(capsys.readouterr().err, "plan")
    assert main(["plan", "--model", str(synthetic_copy), "--plot", str(synthetic_copy / "new" / "p.png")]) == 2
    capsys.readouterr()
    assert tree_hash(synthetic_copy) == before


def test_plan_plot_directory_existing_and_atomic(synthetic, tmp_path, capsys):
    """``--plot DIR`` was a traceback; an existing file is replaced only with --overwrite, through a temp sibling."""
    assert main(["plan", "--model", str(synthetic), "--plot", str(tmp_path)]) == 2
    assert "is a directory" in one_error(capsys.readouterr().err, "plan")
    png = tmp_path / "p.png"
    assert main(["plan", "--model", str(synthetic), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG
    png.write_bytes(b"mine")
    assert main(["plan", "--model", str(synthetic), "--plot", str(png)]) == 2
    assert "already exists" in one_error(capsys.readouterr().err, "plan") and png.read_bytes() == b"mine"
    assert main(["plan", "--model", str(synthetic), "--plot", str(png), "--overwrite"]) == 0
    assert png.read_bytes()[:8] == PNG and sorted(tmp_path.iterdir()) == [png]


def test_atomic_file_writer_rules(tmp_path):
    inp = tmp_path / "model"
    inp.mkdir()
    (inp / "config.json").write_text("{}")
    with pytest.raises(NasrtError, match="overlaps the input"):
        write_text_atomic(inp / "config.json", "x", overwrite=True, inputs=(inp,))
    with pytest.raises(NasrtError, match="overlaps the input"):
        write_text_atomic(inp / "sub" / "r.txt", "x", inputs=(inp,))
    link = tmp_path / "link.json"
    link.symlink_to(inp / "config.json")  # a link to an input is that input
    with pytest.raises(NasrtError, match="overlaps the input"):
        write_text_atomic(link, "x", overwrite=True, inputs=(inp,))
    with pytest.raises(NasrtError, match="is a directory"):
        write_text_atomic(inp, "x", overwrite=True)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(NasrtError, match="not a regular file"):
        write_text_atomic(fifo, "x", overwrite=True)
    out = tmp_path / "report.txt"
    write_text_atomic(out, "one")
    with pytest.raises(OutputExistsError):
        write_text_atomic(out, "two")
    write_text_atomic(out, "two", overwrite=True)
    assert out.read_text() == "two"
    with pytest.raises(RuntimeError), atomic_output_file(out, overwrite=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert out.read_text() == "two" and (inp / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.json", "model", "report.txt"]
    with pytest.raises(NasrtError, match="give a file name"):
        check_output_file(tmp_path / "..", overwrite=True)


# ---- defect 2: nasrt fixtures --output_dir --------------------------------------------------------------------

@pytest.mark.parametrize("what", ["all-variants", "nemotron-51b"])
def test_fixtures_refuse_an_existing_dir_and_replace_it_atomically(what, synthetic_copy, capsys):
    (synthetic_copy / "model-00009-of-00009.safetensors").write_bytes(b"old shard")
    before = tree_hash(synthetic_copy)
    assert main(["fixtures", what, "--output_dir", str(synthetic_copy)]) == 2
    assert "already exists" in one_error(capsys.readouterr().err, "fixtures")
    assert tree_hash(synthetic_copy) == before
    assert main(["fixtures", what, "--output_dir", str(synthetic_copy), "--overwrite"]) == 0
    names = sorted(p.name for p in synthetic_copy.iterdir())
    assert "model-00009-of-00009.safetensors" not in names  # replaced as a whole, not mixed with old shards
    assert "config.json" in names and load_spec(synthetic_copy) is not None
    assert [p for p in synthetic_copy.parent.iterdir() if p.name.startswith(".")] == []


# ---- every command that writes files: output at an input refuses, inputs unchanged ------------------------------

#: (command, output flag) pairs that write files; test_every_writer_is_covered keeps this list complete.
WRITERS = {("convert", "--output_dir"), ("quantize", "--output_dir"), ("fixtures", "--output_dir"),
           ("triton", "--output_dir"), ("build", "--output_dir"), ("plan", "--plot"), ("demo", "--output_dir"),
           ("derive", "--output_dir"), ("serve-config", "--output_dir")}
_OUTPUT_DEST = re.compile(r"^(output(_dir|_file|_path)?|plot|save\w*|record\w*|report\w*|log_file|export_dir)$")


def test_every_writer_is_covered():
    found = set()
    for name in COMMANDS:
        sub = build_parser(name)._subparsers._group_actions[0].choices[name]
        stack = [sub]
        while stack:  # nested subcommands (eval perplexity)
            p = stack.pop()
            for action in p._actions:
                if isinstance(action, argparse._SubParsersAction):
                    stack.extend(action.choices.values())
                elif _OUTPUT_DEST.match(action.dest or ""):
                    found.add((name, max(action.option_strings, key=len)))
    assert found <= WRITERS, f"commands that write files without a case in test_outputs_at_inputs: {found - WRITERS}"


def _cases(hf_tok, ckpt, smollm2):
    q = ["--calib_size", "2", "--calib_max_seq_length", "16"]
    return {
        "convert=input": (["convert", "--model_dir", hf_tok, "--output_dir", hf_tok, "--overwrite"], [hf_tok]),
        "convert-inside": (["convert", "--model_dir", hf_tok, "--output_dir", hf_tok / "out"], [hf_tok]),
        "quantize-inside": (["quantize", "--model_dir", hf_tok, "--output_dir", hf_tok / "fp8", *q], [hf_tok]),
        "quantize=input": (["quantize", "--model_dir", hf_tok, "--output_dir", hf_tok, "--overwrite", *q], [hf_tok]),
        "triton-in-ckpt": (["triton", "--reference", "--checkpoint_dir", ckpt, "--tokenizer_dir", hf_tok,
                            "--output_dir", ckpt / "repo"], [ckpt, hf_tok]),
        "triton-in-tokenizer": (["triton", "--reference", "--checkpoint_dir", ckpt, "--tokenizer_dir", hf_tok,
                                 "--output_dir", hf_tok / "repo", "--overwrite"], [ckpt, hf_tok]),
        "plan-plot-config": (["plan", "--model", hf_tok, "--plot", hf_tok / "config.json", "--overwrite"], [hf_tok]),
        "plan-plot-inside": (["plan", "--model", ckpt, "--plot", ckpt / "plot.png"], [ckpt]),
        "fixtures-existing": (["fixtures", "all-variants", "--output_dir", hf_tok], [hf_tok]),
        "fixtures-smollm2-cache": (["fixtures", "smollm2", "--output_dir", smollm2 / "copy", "--overwrite"],
                                   [smollm2]),
        "build=input": (["build", "--checkpoint_dir", ckpt, "--profile", "h100x1-fp8", "--output_dir", ckpt,
                         "--overwrite"], [ckpt]),
        "build-inside": (["build", "--checkpoint_dir", ckpt, "--profile", "h100x1-fp8", "--output_dir",
                          ckpt / "engine"], [ckpt]),
        "demo-inside-model": (["demo", "--output_dir", smollm2 / "demo"], [smollm2]),
        "derive-inside": (["derive", "--model_dir", smollm2, "--output_dir", smollm2 / "derived"], [smollm2]),
        "serve-config-inside": (["serve-config", "--model_dir", hf_tok, "--output_dir", hf_tok / "serve"], [hf_tok]),
        "triton-llmapi-inside": (["triton", "--backend", "pytorch", "--model_dir", hf_tok, "--output_dir",
                                  hf_tok / "repo", "--overwrite"], [hf_tok]),
    }


CASES = ["convert=input", "convert-inside", "quantize-inside", "quantize=input", "triton-in-ckpt",
         "triton-in-tokenizer", "plan-plot-config", "plan-plot-inside", "fixtures-existing", "fixtures-smollm2-cache",
         "build=input", "build-inside", "demo-inside-model", "derive-inside", "serve-config-inside",
         "triton-llmapi-inside"]


def test_cases_cover_every_writer():
    assert all(any(c.split("=")[0].startswith(w[0]) for c in CASES) for w in WRITERS)


@pytest.mark.parametrize("case", CASES)
def test_outputs_at_inputs(case, hf_tok, ckpt, smollm2, no_trtllm, capsys):
    argv, inputs = _cases(hf_tok, ckpt, smollm2)[case]
    before = tree_hash(*inputs)
    rc = main([str(a) for a in argv])
    line = one_error(capsys.readouterr().err, argv[0])
    assert rc == 2
    if not case.startswith(("build", "fixtures-existing")):
        assert "overlaps the input" in line, line
    assert tree_hash(*inputs) == before, "an input changed"


# ---- defect 6: stale temporary siblings, SIGTERM like SIGINT ---------------------------------------------------

def test_stale_siblings_named_then_removed_with_overwrite(synthetic, tmp_path, caplog):
    out = tmp_path / "ckpt"
    pid = dead_pid()
    stale_dir = tmp_path / f".ckpt.tmp-{pid}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "rank0.safetensors").write_bytes(b"\0" * 4096)
    stale_old = tmp_path / f".ckpt.old-{pid}-89abcdef"
    stale_old.mkdir()
    live = tmp_path / f".ckpt.tmp-{os.getpid()}-deadbeef"  # a running writer's: never touched
    live.mkdir()
    other = tmp_path / f".other.tmp-{pid}-0123abcd"  # another output's
    other.mkdir()
    caplog.set_level(logging.WARNING, logger="nasrt.atomic")
    assert main(["convert", "--model_dir", str(synthetic), "--output_dir", str(out)]) == 0
    assert str(stale_dir) in caplog.text and str(stale_old) in caplog.text and "--overwrite" in caplog.text
    assert str(live) not in caplog.text and str(other) not in caplog.text
    assert stale_dir.exists() and stale_old.exists()
    caplog.clear()
    assert main(["convert", "--model_dir", str(synthetic), "--output_dir", str(out), "--overwrite"]) == 0
    assert "removed 2" in caplog.text
    assert not stale_dir.exists() and not stale_old.exists() and live.exists() and other.exists()


def test_reused_pid_is_not_the_writer(tmp_path):
    """A sibling named after a PID that now belongs to a process started after the sibling was written is stale."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        time.sleep(0.2)
        old = tmp_path / f".out.tmp-{proc.pid}-0123abcd"
        old.mkdir()
        os.utime(old, (time.time() - 3600, time.time() - 3600))
        assert atomic.stale_siblings(tmp_path / "out") == [old]
        os.utime(old, None)  # written now: the running process may be its writer
        assert atomic.stale_siblings(tmp_path / "out") == []
    finally:
        proc.kill()
        proc.wait()


def test_stale_file_siblings_of_a_plot(synthetic, tmp_path, caplog):
    png = tmp_path / "p.png"
    stale = tmp_path / f".p.png.tmp-{dead_pid()}-0123abcd"
    stale.write_bytes(b"half a png")
    caplog.set_level(logging.WARNING, logger="nasrt.atomic")
    assert main(["plan", "--model", str(synthetic), "--plot", str(png)]) == 0
    assert str(stale) in caplog.text and stale.exists()
    assert main(["plan", "--model", str(synthetic), "--plot", str(png), "--overwrite"]) == 0
    assert not stale.exists()


def test_sigterm_unwinds_like_ctrl_c(tmp_path):
    """SIGTERM raises Terminated (a KeyboardInterrupt) in the main thread: the atomic temp dir is removed; a second
    signal during the cleanup is ignored; afterwards the previous handler is back."""
    prev = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    with pytest.raises(Terminated) as info, terminate_like_interrupt(), atomic_output_dir(out) as tmp:
        (tmp / "part").write_bytes(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert info.value.signum == signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with terminate_like_interrupt():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Terminated:
            os.kill(os.getpid(), signal.SIGTERM)  # ignored while unwinding
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) == prev


def test_cli_exit_code_on_sigterm(synthetic, tmp_path, capsys, monkeypatch):
    """main() reports a SIGTERM as one line, exit 128+15, nothing under the output name."""
    import nasrt.convert

    real = nasrt.convert.write_rank

    def slow(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return real(*a, **k)

    monkeypatch.setattr(nasrt.convert, "write_rank", slow)
    rc = main(["convert", "--model_dir", str(synthetic), "--output_dir", str(tmp_path / "ck")])
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGTERM and "nasrt convert: terminated (SIGTERM)" in err
    assert list(tmp_path.iterdir()) == []


# ---- defect 8: stop words on text ----------------------------------------------------------------------------

def test_find_stop():
    assert find_stop("The capital is Paris.", ["Paris"]) == (15, 0)
    assert find_stop("The capital is Pa", ["Paris"]) == (None, 2)
    assert find_stop("abc", ["zz", "c!"]) == (None, 1)
    assert find_stop("x Paris y London", ["London", "Paris"]) == (2, 0)  # the earliest one


def test_text_stops_map_onto_tokens():
    pieces = {1: "The", 2: " capital", 3: " is", 4: " Paris", 5: ".", 6: "Par", 7: "is"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    stops = TextStops(["Paris"], decode)
    seq = [1, 2, 3]
    assert [stops.update(seq[: k + 1]) for k in range(3)] == [(None, 0), (None, 0), (None, 0)]
    assert stops.update([1, 2, 3, 4]) == (3, 0)  # " Paris" is dropped whole: "The capital is"
    split = TextStops(["Paris"], decode)
    assert split.update([6]) == (None, 1)  # "Par" may begin "Paris": held back
    assert split.update([6, 7]) == (0, 0)


def test_generate_stops_on_decoded_text(ckpt):
    """Stop strings match the decoded text wherever token boundaries fall."""
    model = load_model(ckpt)
    prompt = [[3, 4, 5]]
    full = generate(model, prompt, SamplingConfig(max_new_tokens=12, end_id=-1))[0]
    decode = lambda ids: "".join(f" <{i}>" for i in ids)  # noqa: E731 - a tokenizer whose pieces start with a space
    stop = f"<{full[5]}>"  # no leading space: as token ids this word would never match
    streamed: list[int] = []
    got = generate(model, prompt, SamplingConfig(max_new_tokens=12, end_id=-1, stop_strings=[stop]),
                   on_token=lambda b, t: streamed.append(t), decode=decode)[0]
    assert got == full[: full.index(full[5])] and streamed == got


@pytest.fixture(scope="module")
def smol_ckpt(smollm2, tmp_path_factory) -> Path:
    return convert_checkpoint(smollm2, tmp_path_factory.mktemp("rel_smol") / "ck", ConvertOptions("bfloat16"),
                              progress=False)


def _paris_argv(smol_ckpt: Path, smollm2: Path, *extra: str) -> list[str]:
    return ["run", "--checkpoint_dir", str(smol_ckpt), "--tokenizer_dir", str(smollm2), "--input_text",
            "What is the capital of France?", "--chat", "--max_output_len", "12", "--dtype", "float32", *extra]


def _answer(argv: list[str], capsys) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out.split('Output: "', 1)[1].rsplit('"', 1)[0]


@pytest.fixture(scope="module")
def paris_full(smol_ckpt, smollm2) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(_paris_argv(smol_ckpt, smollm2, "--no-streaming")) == 0
    return buf.getvalue().split('Output: "', 1)[1].rsplit('"', 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming"])
def test_run_stop_words_paris(streaming, smol_ckpt, smollm2, paris_full, capsys):
    """``--stop_words Paris`` must stop at " Paris" (a different token because of the leading space)."""
    assert " Paris" in paris_full
    cut = _answer(_paris_argv(smol_ckpt, smollm2, streaming, "--stop_words", "Paris"), capsys)
    assert "Paris" not in cut and paris_full.startswith(cut) and len(cut) >= paris_full.index(" Paris")


# ---- defect 8 / issue 8 §6b: flags refused by name, before any work -------------------------------------------

MISSING = "/nonexistent/nasrt-checkpoint"


@pytest.mark.parametrize("flag,value", [("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-1"),
                                        ("--top_p", "1.5"), ("--top_p", "nan"), ("--top_k", "-2"),
                                        ("--max_output_len", "-1")])
def test_run_sampling_flags_checked_before_loading(flag, value, capsys):
    rc = main(["run", "--checkpoint_dir", MISSING, "--input_text", "hi", flag, value])
    line = one_error(capsys.readouterr().err, "run")
    assert rc == 2 and flag in line and MISSING not in line


@pytest.mark.parametrize("argv", [["run", "--checkpoint_dir", MISSING, "--input_text", "hi", "--end_id", "two"],
                                  ["client", "--text", "hi", "--end_id", "two"]])
def test_end_id_not_an_integer(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--end_id" in err and "invalid int value: 'two'" in err


def test_run_empty_input_file(tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("\n  \n")
    assert main(["run", "--checkpoint_dir", MISSING, "--input_file", str(f)]) == 2
    line = one_error(capsys.readouterr().err, "run")
    assert "--input_file" in line and "no prompt" in line and "give --input_text" not in line
    f.write_bytes(b"\xff\xfe bad")
    assert main(["run", "--checkpoint_dir", MISSING, "--input_file", str(f)]) == 2
    assert "not UTF-8" in one_error(capsys.readouterr().err, "run")


def test_plan_errors_name_its_own_flags(smollm2, capsys):
    assert main(["plan", "--model", str(smollm2), "--tp", "2"]) == 2
    line = one_error(capsys.readouterr().err, "plan")
    assert "--tp 2" in line and "--tp_size" not in line


def test_eval_flags(tmp_path, capsys):
    assert main(["eval", "perplexity", "--checkpoint_dir", MISSING, "--max_chars", "-10"]) == 2
    assert "--max_chars -10" in one_error(capsys.readouterr().err, "eval")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    assert main(["eval", "perplexity", "--checkpoint_dir", MISSING, "--text", str(bad)]) == 2
    line = one_error(capsys.readouterr().err, "eval")
    assert "--text" in line and "not UTF-8" in line


@pytest.mark.parametrize("extra,needle", [(["--url", "nonsense"], "--url"), (["--url", "http://[::1"], "--url"),
                                          (["--url", "http://127.0.0.1:99999"], "--url"),
                                          (["--url", "ftp://127.0.0.1:8000"], "--url"),
                                          (["--timeout", "0"], "--timeout"), (["--timeout", "nan"], "--timeout"),
                                          (["--timeout", "-3"], "--timeout")])
def test_client_bad_url_or_timeout(extra, needle, capsys):
    assert main(["client", "--text", "hi", *extra]) == 2
    assert needle in one_error(capsys.readouterr().err, "client")


def test_help_has_no_sphinx_markup(capsys):
    texts = []
    for argv in [["--help"], *([name, "--help"] for name in COMMANDS), ["eval", "perplexity", "--help"]]:
        with pytest.raises(SystemExit):
            main(argv)
        texts.append(capsys.readouterr().out)
    for text in texts:
        assert not re.search(r":(mod|func|class|meth|attr|data):|``", text), text[:400]
