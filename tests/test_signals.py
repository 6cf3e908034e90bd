"""Interrupted work leaves nothing (issue 12, defect 6): SIGTERM and SIGKILL of ``convert --workers 2`` and of
``quantize`` in the middle of the run. Each case runs the real CLI in a child process on a model big enough that the
kill lands mid-run (the test waits for the temporary output to appear, and for convert for a worker's rank file),
then checks: nothing under the final name, no process of the run left, and the next run names the debris (and
with ``--overwrite`` removes it)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from nasrt.arch import from_hf_config, load_spec
from nasrt.cli import main
from nasrt.fixtures import write_hf_checkpoint
from nasrt.presets import hf_config
from nasrt.quantize.tiny_tokenizer import write_tiny_tokenizer
from nasrt.tensor_map import expected_hf_tensors

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
#: 12 layers of width 1024 in float32: about 480 MB, converted to bfloat16 in 4 ranks (cast path: CPU-bound)
BIG_PATTERN = " ".join(f"{i}:g2/4.0" for i in range(12))


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    cfg = hf_config(BIG_PATTERN, hidden_size=1024, num_attention_heads=8, vocab_size=2048,
                    max_position_embeddings=4096, torch_dtype="float32")
    d = tmp_path_factory.mktemp("big") / "hf"
    # content does not matter here, size does: constant weights are quick to make
    tensors = {n: torch.full(s, 0.01 if len(s) > 1 else 1.0) for n, s in expected_hf_tensors(from_hf_config(cfg)).items()}
    write_hf_checkpoint(d, cfg, tensors, shards=2)
    write_tiny_tokenizer(d, load_spec(d).vocab_size)
    return d


def _siblings(out: Path) -> list[Path]:
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "nasrt", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _kill_mid_run(proc: subprocess.Popen, sig: int, want_children: int, out: Path) -> tuple[int, dict[str, int]]:
    """Send ``sig`` to the run; return its exit code and the sizes of what it left right after it ended. Every
    process it had started must be gone within 5 s (workers that finish their rank after their parent died fail)."""
    parent = psutil.Process(proc.pid)
    family = parent.children(recursive=True)
    workers = [p for p in family if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) >= want_children, [p.cmdline() for p in family]
    os.kill(proc.pid, sig)
    rc = proc.wait(timeout=60)
    left = {str(d): _sizes(d) if d.is_dir() else d.stat().st_size for d in _siblings(out)}
    deadline = time.monotonic() + 5
    while _alive(family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(family), f"left running after {signal.Signals(sig).name}: " \
                               f"{[(p.pid, p.cmdline()) for p in _alive(family)]}"
    return rc, left


def _sizes(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in d.rglob("*") if p.is_file()}


def _rank_file_appeared(out: Path):
    def check() -> bool:
        return any(any(s.glob("rank*.safetensors")) for s in _siblings(out) if s.is_dir())
    return check


CONVERT = ["--dtype", "bfloat16", "--tp_size", "4", "--workers", "2"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_convert_workers_killed_mid_run(sig, big, synthetic, tmp_path, caplog):
    out = tmp_path / "ckpt"
    proc = _start(["convert", "--model_dir", str(big), "--output_dir", str(out), *CONVERT])
    _wait_for(_rank_file_appeared(out), proc, "a worker's rank file")
    rc, left = _kill_mid_run(proc, sig, want_children=2, out=out)
    output = proc.stdout.read()
    assert not out.exists(), "something was left under the final name"
    debris = _siblings(out)
    if sig == signal.SIGTERM:
        assert rc == 128 + signal.SIGTERM, output[-2000:]
        assert "terminated (SIGTERM)" in output
        assert "Traceback" not in output, output[-3000:]
        assert debris == [], debris
        return
    assert rc == -signal.SIGKILL
    assert len(debris) == 1 and debris[0].is_dir(), debris
    time.sleep(1.0)
    assert _sizes(debris[0]) == left[str(debris[0])], "a worker kept writing after kill -9 of its parent"
    # the next run names the debris and leaves it; with --overwrite it removes it
    caplog.set_level(logging.WARNING, logger="nasrt.atomic")
    assert main(["convert", "--model_dir", str(synthetic), "--output_dir", str(out)]) == 0
    assert str(debris[0]) in caplog.text and "--overwrite" in caplog.text
    assert debris[0].exists()
    caplog.clear()
    assert main(["convert", "--model_dir", str(synthetic), "--output_dir", str(out), "--overwrite"]) == 0
    assert not debris[0].exists() and str(debris[0]) in caplog.text
    assert _siblings(out) == [] and (out / "rank0.safetensors").is_file()


QUANTIZE = ["--dtype", "bfloat16", "--kv_cache_dtype", "fp8", "--calib_size", "64", "--calib_max_seq_length", "128",
            "--batch_size", "4"]


@pytest.fixture(scope="module")
def small_tok(synthetic, tmp_path_factory) -> Path:
    """The all-variants model with a tokenizer: a quick quantize for the 'next run'."""
    import shutil

    d = tmp_path_factory.mktemp("small_q") / "hf"
    shutil.copytree(synthetic, d)
    write_tiny_tokenizer(d, load_spec(d).vocab_size)
    return d


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_quantize_killed_mid_calibration(sig, big, small_tok, tmp_path, caplog):
    out = tmp_path / "fp8"
    proc = _start(["quantize", "--model_dir", str(big), "--output_dir", str(out), *QUANTIZE])
    _wait_for(lambda: bool(_siblings(out)), proc, "the temporary output dir")
    time.sleep(1.0)  # calibration is under way (the temp dir appears right before it starts)
    assert proc.poll() is None, "quantize finished before it could be interrupted: make the model bigger"
    rc, _left = _kill_mid_run(proc, sig, want_children=0, out=out)
    output = proc.stdout.read()
    assert not out.exists(), "something was left under the final name"
    debris = _siblings(out)
    if sig == signal.SIGTERM:
        assert rc == 128 + signal.SIGTERM, output[-2000:]
        assert "terminated (SIGTERM)" in output and "Traceback" not in output, output[-3000:]
        assert debris == [], debris
        return
    assert rc == -signal.SIGKILL
    assert len(debris) == 1, debris
    caplog.set_level(logging.WARNING, logger="nasrt.atomic")
    small = ["--dtype", "bfloat16", "--calib_size", "4", "--calib_max_seq_length", "32"]
    assert main(["quantize", "--model_dir", str(small_tok), "--output_dir", str(out), *small]) == 0
    assert str(debris[0]) in caplog.text and debris[0].exists()
    caplog.clear()
    assert main(["quantize", "--model_dir", str(small_tok), "--output_dir", str(out), *small, "--overwrite"]) == 0
    assert not debris[0].exists() and str(debris[0]) in caplog.text
    assert _siblings(out) == []


def test_convert_worker_killed(big, tmp_path):
    """A worker killed under the converter (the OOM killer, say) stops the run with one error line instead of
    waiting forever for its rank; the other worker is stopped and nothing is left."""
    out = tmp_path / "ckpt"
    proc = _start(["convert", "--model_dir", str(big), "--output_dir", str(out), *CONVERT])
    _wait_for(_rank_file_appeared(out), proc, "a worker's rank file")
    family = psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in family if "spawn_main" in " ".join(p.cmdline())]
    assert len(workers) >= 2
    workers[0].kill()
    rc = proc.wait(timeout=120)
    output = proc.stdout.read()
    assert rc == 2 and "nasrt convert: error: a conversion worker died" in output, output[-3000:]
    assert "Traceback" not in output
    deadline = time.monotonic() + 15
    while _alive(family) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(family)
    assert not out.exists() and _siblings(out) == []
