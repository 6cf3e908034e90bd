"""``nasrt serve`` (issue 9, scope 4): the real ``nasrt serve`` command in a subprocess on loopback, queried with the
real ``openai`` client — chat says Paris, streaming joins to the non-streamed text, /v1/models, 8 concurrent
requests equal each alone, OpenAI-style 4xx errors after which the server keeps serving, a disconnected stream is
cancelled, SIGTERM shuts down cleanly. One server start for the whole module."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from nasrt import cli
from nasrt.deploy.serve.server import free_port, wait_healthy

pytestmark = pytest.mark.slow  # one model load + a few dozen short generations (~1-2 min on 2 busy cores)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NAME = "smol"
CONTEXT = 512
PROMPTS = ["The quick brown fox", "Paris is", "def fibonacci(n):", "Once upon a time", "The best way to learn",
           "1, 2, 3, 4,", "My favourite food is", "In the year 2000"]


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "nasrt", "serve", "--model_dir", str(smollm2), "--port",
                                 str(port), "--served_model_name", NAME, "--max_batch_size", "8",
                                 "--max_seq_len", str(CONTEXT)], stdout=logf, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(url, proc, 300):
        proc.kill()
        pytest.fail(f"nasrt serve did not come up:\n{log_path.read_text()}")
    proc.log_path = log_path
    proc.url = url
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _complete(client, prompt: str, max_tokens: int = 10) -> str:
    return client.completions.create(model=NAME, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text


@pytest.fixture(scope="module")
def answer(client) -> str:
    r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10
    return r.choices[0].message.content


def test_chat_says_paris(answer):
    assert "Paris" in answer


def test_models_lists_the_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_streaming_joins_to_the_whole_text(client, answer):
    chunks = list(client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(pieces)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True))
    assert streamed == _complete(client, PROMPTS[1], 8)


def test_stop_strings_match_decoded_text(client, answer):
    cut = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16, temperature=0,
                                         stop=["Paris"]).choices[0]
    assert "Paris" in answer and "Paris" not in cut.message.content and cut.finish_reason == "stop"
    assert answer.startswith(cut.message.content) and cut.message.content.strip()


def test_ignore_eos_extension_generates_max_tokens(client):
    r = client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 24 and r.choices[0].finish_reason == "length"


def test_eight_concurrent_requests_equal_each_alone(client, server):
    alone = [_complete(client, p) for p in PROMPTS]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: _complete(client, p), PROMPTS))
    assert together == alone and len(set(alone)) > 4
    log = server.log_path.read_text()
    assert "batch now 8" in log or "batch now 7" in log  # they really were decoded together


@pytest.mark.parametrize("kwargs, status", [
    ({"model": NAME, "messages": QUESTION, "max_tokens": -5}, 422),
    ({"model": NAME, "messages": openai.omit, "max_tokens": 4}, 422),  # no messages (omit: not sent at all)
    ({"model": "no-such-model", "messages": QUESTION, "max_tokens": 4}, 404),
    ({"model": NAME, "messages": [{"role": "user", "content": "word " * (CONTEXT + 10)}], "max_tokens": 4}, 400),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client, kwargs, status):
    body = {k: v for k, v in kwargs.items() if v is not openai.omit}
    r = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    with pytest.raises(openai.APIStatusError) as exc:  # the openai client reads them as API errors
        client.chat.completions.create(**kwargs)
    assert exc.value.status_code == status
    assert "Paris" in client.chat.completions.create(model=NAME, messages=QUESTION, max_tokens=16,
                                                     temperature=0).choices[0].message.content


def test_disconnected_stream_is_cancelled(client, server):
    stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Count to 1000."}],
                                            max_tokens=400, temperature=0, stream=True)
    for i, _chunk in enumerate(stream):
        if i == 3:
            break
    stream.close()
    t0 = time.monotonic()
    assert _complete(client, PROMPTS[0], 4)
    assert time.monotonic() - t0 < 30
    deadline = time.monotonic() + 10
    while "client went away; request cancelled" not in server.log_path.read_text():
        assert time.monotonic() < deadline, server.log_path.read_text()[-2000:]
        time.sleep(0.2)


def test_checkpoint_dir_serves_the_same_answers(client, smollm2, tmp_path):
    """--checkpoint_dir (nasrt's converted checkpoint) behind the in-process server gives what --model_dir gives."""
    from nasrt.convert import ConvertOptions, convert_checkpoint
    from nasrt.deploy.serve.server import ServeOptions, background_server, load_served_model

    ckpt = convert_checkpoint(smollm2, tmp_path / "ckpt", ConvertOptions(dtype="float32"), progress=False)
    served = load_served_model(ServeOptions(checkpoint_dir=str(ckpt), tokenizer_dir=str(smollm2),
                                            served_model_name=NAME))
    with background_server(served) as url:
        other = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert _complete(other, PROMPTS[2]) == _complete(client, PROMPTS[2])
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=2)


def test_bad_flags_are_refused_before_loading(capsys, smollm2):
    assert cli.main(["serve", "--model_dir", str(smollm2), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert cli.main(["serve", "--model_dir", str(smollm2), "--checkpoint_dir", str(smollm2)]) == 2
    assert "exactly one" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--model_dir", str(smollm2), "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err


def test_sigterm_shuts_down_cleanly(server):
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0, server.log_path.read_text()[-2000:]
    assert "stopped" in server.log_path.read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/health", timeout=2)
    assert not os.path.exists(f"/proc/{server.pid}")
