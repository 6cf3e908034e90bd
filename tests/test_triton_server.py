"""End to end on a REAL Triton server (2.51, bundled in nvidia-pytriton) on 127.0.0.1: the ``nasrt triton
--reference`` repository of SmolLM2 (real preprocessing / postprocessing; ``tensorrt_llm`` answered by the
reference runtime), queried with ``nasrt client``. One server start for the whole module."""

from __future__ import annotations

import glob
import os
import re
import threading
import time

import pytest
import requests

from nasrt import cli
from nasrt.convert import ConvertOptions, convert_checkpoint
from nasrt.deploy.triton.client import generate
from nasrt.deploy.triton.server import LocalTritonServer
from nasrt.errors import NasrtError

pytestmark = pytest.mark.slow  # one real server start (~15-30 s on 2 busy cores)

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2):
    root = tmp_path_factory.mktemp("triton_server")
    ckpt = convert_checkpoint(smollm2, root / "ckpt", ConvertOptions(dtype="bfloat16"))
    rc = cli.main(["triton", "--reference", "--checkpoint_dir", str(ckpt), "--tokenizer_dir", str(smollm2),
                   "--output_dir", str(root / "repo"), "--max_seq_len", "256", "--max_batch_size", "8"])
    assert rc == 0
    srv = LocalTritonServer(root / "repo", ready_timeout=180, log_file=root / "tritonserver.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def answer(server) -> str:
    """The whole (non-streamed) greedy answer to the chat question."""
    return generate(server.url, QUESTION, 16, chat=True)


def test_nasrt_client_gets_paris(server, capsys):
    rc = cli.main(["client", "--url", server.url, "--chat", "--text", QUESTION, "--max_tokens", "16"])
    out = capsys.readouterr().out
    assert rc == 0 and "Paris" in out, f"answer {out!r}; server log:\n{server.log_tail()}"


def test_streaming_gets_paris_token_by_token(server, answer, capsys):
    pieces: list[str] = []
    text = generate(server.url, QUESTION, 16, chat=True, stream=True, on_text=pieces.append)
    assert "Paris" in text and len(pieces) >= 3, pieces  # one event per token, not one final blob
    assert text == answer  # greedy: the streamed pieces add up to the whole answer
    rc = cli.main(["client", "--url", server.url, "--chat", "--stream", "--text", QUESTION, "--max_tokens", "16"])
    assert rc == 0 and "Paris" in capsys.readouterr().out


def test_stop_words_travel_through_the_ensemble(server, answer):
    cut = generate(server.url, QUESTION, 16, chat=True, params={"stop_words": [" Paris"]})
    assert "Paris" in answer and "Paris" not in cut
    assert answer.startswith(cut.rstrip()) and cut.strip()


def test_errors_come_back_clearly(server, capsys):
    with pytest.raises(NasrtError, match="beam_width=2 is not supported"):
        generate(server.url, QUESTION, 8, chat=True, params={"beam_width": 2})
    with pytest.raises(NasrtError, match="max_seq_len 256"):
        generate(server.url, QUESTION, 250, chat=True)
    rc = cli.main(["client", "--url", server.url, "--text", QUESTION, "--max_tokens", "8", "--model", "nosuch"])
    assert rc == 2 and "nasrt client: error:" in capsys.readouterr().err
    assert server.running  # a bad request never takes the server down


STORIES = [f"Story {i}: once upon a time, in a land far away," for i in range(8)]


def _batch_sizes(server, start: int) -> list[int]:
    """The decode-batch sizes the engine logged (``... batch now N``) after byte ``start`` of the server log."""
    return [int(n) for n in re.findall(r"batch now (\d+)", server.log_path.read_text()[start:])]


def test_eight_concurrent_requests_are_decoded_together(server):
    """Issue 12 defect 7: concurrent requests are batched (they used to be served one at a time). Checked in the
    engine's own log, not by wall time (how much batching saves depends on the CPU: it is a bench/ figure)."""
    start = len(server.log_path.read_text())
    alone = [generate(server.url, p, 12) for p in STORIES]
    mid = len(server.log_path.read_text())
    assert max(_batch_sizes(server, start)) == 1, "one request at a time ran in a batch of several"
    together: list[str | None] = [None] * len(STORIES)

    def one(i: int) -> None:
        together[i] = generate(server.url, STORIES[i], 12)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(STORIES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(together) and all(alone)
    # bf16 checkpoint: batched GEMMs round differently, so texts may differ slightly from the lone runs
    # (the fp32 equality is pinned in test_batcher.py / test_serve.py); here the point is batching.
    sizes = _batch_sizes(server, mid)
    assert max(sizes) >= 4, f"8 concurrent requests were decoded in batches of {sizes}"


def _cancellations(server) -> int:
    return server.log_path.read_text(errors="replace").count("cancelled after")


def test_disconnected_client_frees_the_model_within_a_second(server):
    """A client that drops ``generate_stream`` mid-generation: Triton marks the request cancelled, the engine drops
    its row at the next step, and a short request right after answers promptly."""
    before = _cancellations(server)
    body = {"input_ids": [1, 504, 3458, 282, 260, 1, 2, 3], "input_lengths": [8], "request_output_len": [5000],
            "streaming": [True], "end_id": [-1]}  # no end id: it would run to the context limit
    with requests.post(f"{server.url}/v2/models/tensorrt_llm/generate_stream", json=body, stream=True,
                       timeout=60) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            events += bool(line)
            if events == 3:
                break
    gone = time.monotonic()
    while _cancellations(server) == before:
        assert time.monotonic() - gone < 10, server.log_tail()
        time.sleep(0.05)
    freed = time.monotonic() - gone
    assert "request_output_len 5000 bounded to 248 by the context of 256 tokens" in server.log_path.read_text()
    assert freed < 1.5, f"the abandoned request was dropped only {freed:.2f} s after the client left"
    t0 = time.monotonic()
    assert generate(server.url, QUESTION, 4, chat=True)
    assert time.monotonic() - t0 < 15


def test_abandoned_ensemble_request_does_not_block_the_next(server):
    """Through the ensemble, Triton 2.51 does not pass a client's disconnect on to the running tensorrt_llm step
    (measured: only direct requests to tensorrt_llm are cancelled), so the abandoned request keeps a batch row
    until it ends (max_tokens is bounded by the context); the next request joins the running batch instead of
    waiting behind it."""
    finished = "finished (length) after 200 tokens"
    before = server.log_path.read_text(errors="replace").count(finished)
    body = {"text_input": "Count from 1 to 1000: 1, 2, 3,", "max_tokens": 200, "stream": True, "end_id": -1}
    with requests.post(f"{server.url}/v2/models/ensemble/generate_stream", json=body, stream=True, timeout=60) as r:
        assert r.status_code == 200
        next(line for line in r.iter_lines() if line)
    assert "Paris" in generate(server.url, QUESTION, 16, chat=True)
    assert server.log_path.read_text(errors="replace").count(finished) == before  # answered while it still ran
    deadline = time.monotonic() + 120
    while server.log_path.read_text(errors="replace").count(finished) == before:
        assert time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)


def test_bad_ports_and_timeouts_are_refused_before_writing(tmp_path, capsys):
    base = ["triton", "--reference", "--checkpoint_dir", str(tmp_path), "--tokenizer_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "repo")]
    for flags, message in ((["--http_port", "70000"], "--http_port 70000 must be a TCP port in 1-65535"),
                           (["--grpc_port", "0"], "--grpc_port 0 must be"),
                           (["--metrics_port", "8000"], "--metrics_port 8000 is also --http_port"),
                           (["--serve_timeout", "0"], "--serve_timeout 0.0 must be")):
        assert cli.main(base + flags) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_start_timeout_reports_progress_and_leaves_nothing(server, tmp_path, monkeypatch, caplog):
    """The ready timeout is a parameter (``--serve_timeout``); progress is logged while waiting; a timeout or an
    interrupt while waiting leaves no server process behind."""
    import nasrt.deploy.triton.server as server_mod

    monkeypatch.setattr(server_mod, "PROGRESS_EVERY_S", 0.5)
    slow = LocalTritonServer(server.repository, ready_timeout=2, log_file=tmp_path / "slow.log")
    with caplog.at_level("INFO", logger="nasrt.deploy.triton.server"), \
            pytest.raises(NasrtError, match="not ready after 2 s .*--serve_timeout"):
        slow.start()  # the model load alone takes longer
    assert "not ready yet after" in caplog.text and not slow.running

    interrupted = LocalTritonServer(server.repository, log_file=tmp_path / "interrupted.log")

    def ctrl_c():
        raise KeyboardInterrupt

    monkeypatch.setattr(interrupted, "models_state", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        interrupted.start()
    assert not interrupted.running and interrupted._workdir is None
    assert glob.glob(f"/dev/shm/{interrupted._shm_prefix}*") == []


def test_teardown_stops_the_server_and_cleans_up(server):
    pid = server.pid
    shm_prefix = server._shm_prefix
    server.stop()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert glob.glob(f"/dev/shm/{shm_prefix}*") == []
