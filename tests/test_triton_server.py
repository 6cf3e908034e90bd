"""End to end on a REAL Triton server (2.51, bundled in nvidia-pytriton) on 127.0.0.1: the ``nasrt triton
--reference`` repository of SmolLM2 (real preprocessing / postprocessing; ``tensorrt_llm`` answered by the
reference runtime), queried with ``nasrt client``. One server start for the whole module."""

from __future__ import annotations

import glob
import os

import pytest

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
                   "--output_dir", str(root / "repo"), "--max_seq_len", "256"])
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


def test_teardown_stops_the_server_and_cleans_up(server):
    pid = server.pid
    shm_prefix = server._shm_prefix
    server.stop()
    assert not server.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert glob.glob(f"/dev/shm/{shm_prefix}*") == []
