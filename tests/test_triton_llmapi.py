"""Issue 9 scope 3: ``nasrt triton --backend pytorch`` writes the llmapi repository; the ``--reference`` variant is
served by the REAL Triton 2.51 server (nvidia-pytriton) on loopback and answers "Paris", streaming included."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import requests
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from nasrt import cli
from nasrt.deploy.pytorch.llm_api import MODEL_YAML_ARGS, check_args
from nasrt.deploy.pytorch.serve_config import ServeRequest, plan_serve_config
from nasrt.deploy.triton.llmapi import QUERY_BODY, query_hint
from nasrt.deploy.triton.server import LocalTritonServer
from nasrt.errors import ConfigError
from nasrt.fixtures import write_config_only

#: Upstream's llmapi tensorrt_llm/config.pbtxt (TensorRT-LLM triton_backend/all_models/llmapi), pinned:
#: name -> (data type, dims, optional).
UPSTREAM_INPUTS = {
    "text_input": ("TYPE_STRING", [-1], False), "image_url": ("TYPE_STRING", [-1], True),
    "streaming": ("TYPE_BOOL", [1], True), "sampling_param_best_of": ("TYPE_INT32", [1], True),
    "sampling_param_temperature": ("TYPE_FP32", [1], True), "sampling_param_top_k": ("TYPE_INT32", [1], True),
    "sampling_param_top_p": ("TYPE_FP32", [1], True), "sampling_param_frequency_penalty": ("TYPE_FP32", [1], True),
    "sampling_param_presence_penalty": ("TYPE_FP32", [1], True),
    "sampling_param_max_tokens": ("TYPE_INT32", [1], True), "sampling_param_stop": ("TYPE_STRING", [-1], True),
    "sampling_param_seed": ("TYPE_UINT64", [1], True),
    "sampling_param_exclude_input_from_output": ("TYPE_BOOL", [1], True),
    "sampling_param_return_perf_metrics": ("TYPE_BOOL", [1], True), "return_finish_reason": ("TYPE_BOOL", [1], True),
    "return_stop_reason": ("TYPE_BOOL", [1], True), "return_cumulative_logprob": ("TYPE_BOOL", [1], True),
    "stop": ("TYPE_BOOL", [1], True), "lora_id": ("TYPE_UINT64", [1], True), "lora_name": ("TYPE_STRING", [1], True),
    "lora_path": ("TYPE_STRING", [1], True), "lora_ckpt_source": ("TYPE_STRING", [1], True),
}
UPSTREAM_OUTPUTS = {
    "text_output": ("TYPE_STRING", [-1]), "finish_reason": ("TYPE_STRING", [-1]), "stop_reason": ("TYPE_STRING", [-1]),
    "cumulative_logprob": ("TYPE_FP32", [-1]), "kv_cache_reused_block": ("TYPE_INT32", [-1]),
    "kv_cache_missed_block": ("TYPE_INT32", [-1]), "kv_cache_alloc_new_blocks": ("TYPE_INT32", [-1]),
    "kv_cache_alloc_total_blocks": ("TYPE_INT32", [-1]), "kv_cache_hit_rate": ("TYPE_FP32", [-1]),
    "arrival_time_ns": ("TYPE_INT64", [1]), "first_scheduled_time_ns": ("TYPE_INT64", [1]),
    "first_token_time_ns": ("TYPE_INT64", [1]), "last_token_time_ns": ("TYPE_INT64", [1]),
    "acceptance_rate": ("TYPE_FP32", [1]), "total_accepted_draft_tokens": ("TYPE_INT32", [1]),
    "total_draft_tokens": ("TYPE_INT32", [1]),
}
QUESTION = "What is the capital of France?"


def _parse(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _dtype(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


@pytest.fixture(scope="module")
def repo(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("llmapi") / "repo"
    assert cli.main(["triton", "--backend", "pytorch", "--model_dir", str(smollm2), "--output_dir", str(out),
                     "--max_batch_size", "4", "--max_seq_len", "1024"]) == 0
    return out


def test_config_pbtxt_parses_with_tritons_protobuf_and_matches_upstream(repo):
    text = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    cfg = _parse(repo / "tensorrt_llm" / "config.pbtxt")
    assert cfg.name == "tensorrt_llm" and cfg.backend == "python"
    assert "max_batch_size" not in text and "decoupled" not in text  # those live in model.yaml's triton_config
    assert [(g.count, model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind)) for g in cfg.instance_group] == \
        [(1, "KIND_CPU")]
    assert {i.name: (_dtype(i.data_type), list(i.dims), i.optional) for i in cfg.input} == UPSTREAM_INPUTS
    assert {o.name: (_dtype(o.data_type), list(o.dims)) for o in cfg.output} == UPSTREAM_OUTPUTS


def test_model_yaml_holds_the_planners_llm_arguments(repo, smollm2, tmp_path):
    y = yaml.safe_load((repo / "tensorrt_llm" / "1" / "model.yaml").read_text())
    check_args(y, MODEL_YAML_ARGS)
    planned = plan_serve_config(smollm2, ServeRequest(batch=4, seq=1024), tmp_path).args
    assert {k: v for k, v in y.items() if k not in ("model", "backend", "triton_config", "trust_remote_code")} == planned
    assert y["model"] == str(smollm2.resolve()) and y["backend"] == "pytorch"
    assert y["max_seq_len"] == 1024 and y["max_batch_size"] == 4
    assert y["triton_config"] == {"max_batch_size": 0, "decoupled": True}
    assert "trust_remote_code" not in y  # plain Llama: no remote code (DeciLM configs carry auto_map)


def test_tensorrt_llms_model_code_is_linked_never_copied(repo, smollm2, tmp_path, capsys):
    # no TensorRT-LLM here: no model.py is written, and the repository says where it comes from
    assert not (repo / "tensorrt_llm" / "1" / "model.py").exists()
    record = json.loads((repo / "nasrt_repository.json").read_text())
    assert record["model_source"] is None
    assert any("triton_backend/all_models/llmapi/tensorrt_llm/1" in line and "trtllm-python-py3" in line
               for line in record["next"])
    # a TensorRT-LLM checkout: its files are symlinked into the repository
    checkout = tmp_path / "TensorRT-LLM"
    src = checkout / "triton_backend/all_models/llmapi/tensorrt_llm/1"
    src.mkdir(parents=True)
    (src / "model.py").write_text("# TensorRT-LLM's own model\n")
    (src / "helpers.py").write_text("# helpers\n")
    out = tmp_path / "r2"
    assert cli.main(["triton", "--backend", "pytorch", "--model_dir", str(smollm2), "--output_dir", str(out),
                     "--llmapi_source", str(checkout)]) == 0
    assert f"linked TensorRT-LLM's model code from {src.resolve()}" in capsys.readouterr().out
    for name in ("model.py", "helpers.py"):
        link = out / "tensorrt_llm" / "1" / name
        assert link.is_symlink() and link.resolve() == (src / name).resolve()
    with pytest.raises(ConfigError, match="--llmapi_source"):
        from nasrt.deploy.triton.llmapi import locate_model_source
        locate_model_source(tmp_path / "nothing")


def test_plan_that_does_not_fit_is_refused_unless_force(tmp_path, capsys):
    d = write_config_only("nemotron-51b", tmp_path / "m")  # BF16 on one H100-80GB
    args = ["triton", "--backend", "pytorch", "--model_dir", str(d), "--output_dir", str(tmp_path / "r"),
            "--max_batch_size", "1", "--max_seq_len", "4096"]
    assert cli.main(args) == 2
    assert "the plan does not fit" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert cli.main([*args, "--force"]) == 0
    y = yaml.safe_load((tmp_path / "r" / "tensorrt_llm" / "1" / "model.yaml").read_text())
    assert y["trust_remote_code"] is True and y["max_seq_len"] == 4096


def test_flags(smollm2, tmp_path, capsys):
    assert cli.main(["triton", "--backend", "pytorch", "--output_dir", str(tmp_path / "r")]) == 2
    assert "--model_dir" in capsys.readouterr().err
    assert cli.main(["triton", "--engine_dir", "x", "--output_dir", str(tmp_path / "r")]) == 2
    assert "--tokenizer_dir is required" in capsys.readouterr().err


# ---- the --reference variant on the real Triton server --------------------------------------------------------

@pytest.fixture(scope="module")
def server(smollm2, repo, tmp_path_factory):
    root = tmp_path_factory.mktemp("llmapi_ref")
    assert cli.main(["triton", "--backend", "pytorch", "--reference", "--model_dir", str(smollm2),
                     "--output_dir", str(root / "repo"), "--max_batch_size", "8", "--max_seq_len", "512"]) == 0
    # the same config.pbtxt as the TensorRT-LLM variant: identical inputs and outputs
    assert (root / "repo" / "tensorrt_llm" / "config.pbtxt").read_text() == \
        (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    srv = LocalTritonServer(root / "repo", ready_timeout=240, log_file=root / "tritonserver.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def prompt(smollm2) -> str:
    """The chat-formatted question (the llmapi model applies no chat template; the client does)."""
    from nasrt.runtime.text import load_tokenizer

    tok = load_tokenizer(smollm2)
    return tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                   add_generation_prompt=True)


def _generate(server, body: dict) -> dict:
    r = requests.post(f"{server.url}/v2/models/tensorrt_llm/generate", json=body, timeout=300)
    return {"status": r.status_code, **r.json()}


@pytest.mark.slow
def test_reference_llmapi_says_paris(server, prompt):
    out = _generate(server, {"text_input": prompt, "sampling_param_max_tokens": 16,
                             "sampling_param_exclude_input_from_output": True, "return_finish_reason": True})
    assert out["status"] == 200 and "Paris" in out["text_output"], f"{out}\n{server.log_tail()}"
    assert out["finish_reason"] in ("stop", "length")
    echoed = _generate(server, {"text_input": prompt, "sampling_param_max_tokens": 16})
    assert echoed["text_output"] == prompt + out["text_output"]  # upstream default: the prompt is echoed


@pytest.mark.slow
def test_reference_llmapi_streams_paris(server, prompt):
    whole = _generate(server, {"text_input": prompt, "sampling_param_max_tokens": 16,
                               "sampling_param_exclude_input_from_output": True})["text_output"]
    r = requests.post(f"{server.url}/v2/models/tensorrt_llm/generate_stream", timeout=300, stream=True,
                      json={"text_input": prompt, "sampling_param_max_tokens": 16, "streaming": True,
                            "sampling_param_exclude_input_from_output": True})
    assert r.status_code == 200
    events = [json.loads(line[len(b"data: "):]) for line in r.iter_lines() if line.startswith(b"data: ")]
    assert all("error" not in e for e in events), events
    pieces = [e["text_output"] for e in events if "text_output" in e]
    assert len([p for p in pieces if p]) >= 3, pieces  # one event per new piece of text
    assert "".join(pieces) == whole and "Paris" in whole  # greedy: the pieces join to the whole answer


@pytest.mark.slow
def test_reference_llmapi_refuses_what_it_cannot_do_and_keeps_serving(server, prompt):
    bad = _generate(server, {"text_input": prompt, "sampling_param_max_tokens": 4, "sampling_param_best_of": 2})
    assert "sampling_param_best_of=2 is not supported" in bad.get("error", ""), bad
    long = _generate(server, {"text_input": "word " * 600, "sampling_param_max_tokens": 4})
    assert "leaving no room for output within max_seq_len 512" in long.get("error", ""), long
    # max_tokens beyond the context is bounded by it (the answer ends at its end-of-sequence token well before)
    bounded = _generate(server, {"text_input": prompt, "sampling_param_max_tokens": 600,
                                 "sampling_param_exclude_input_from_output": True, "return_finish_reason": True})
    assert "Paris" in bounded["text_output"] and bounded["finish_reason"] == "stop", bounded
    assert "sampling_param_max_tokens 600 bounded to" in server.log_path.read_text(errors="replace")
    assert "Paris" in _generate(server, {"text_input": prompt, "sampling_param_max_tokens": 16})["text_output"]
    assert server.running


STORIES = [f"Story {i}: once upon a time, in a land far away," for i in range(8)]


@pytest.mark.slow
def test_reference_llmapi_batches_concurrent_requests(server):
    """Issue 12 defect 7: concurrent requests decode together on the batching engine (they used to be served
    one at a time); both timings are measured here, on the same server."""
    body = {"sampling_param_max_tokens": 12, "sampling_param_exclude_input_from_output": True}
    sequential, concurrent, alone, together = _sequential_and_concurrent(server, body)
    assert all(r["status"] == 200 and r["text_output"] for r in alone), alone
    assert all(r is not None and r["status"] == 200 and r["text_output"] for r in together), together
    assert concurrent < 0.7 * sequential, f"8 concurrent {concurrent:.1f} s vs 8 sequential {sequential:.1f} s"


def _sequential_and_concurrent(server, body: dict) -> tuple[float, float, list[dict], list[dict | None]]:
    t0 = time.monotonic()
    alone = [_generate(server, {"text_input": p, **body}) for p in STORIES]
    sequential = time.monotonic() - t0
    together: list[dict | None] = [None] * len(STORIES)

    def one(i: int) -> None:
        together[i] = _generate(server, {"text_input": STORIES[i], **body})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(STORIES))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return sequential, time.monotonic() - t0, alone, together


@pytest.mark.slow
def test_reference_llmapi_batches_concurrent_requests_when_not_decoupled(smollm2, tmp_path):
    """``--no_decoupled`` (Triton hands ``execute`` one request at a time there, no dynamic batching in the
    llmapi config): the model still answers through the response sender, so concurrent requests decode together."""
    assert cli.main(["triton", "--backend", "pytorch", "--reference", "--no_decoupled", "--model_dir", str(smollm2),
                     "--output_dir", str(tmp_path / "repo"), "--max_batch_size", "8", "--max_seq_len", "256"]) == 0
    assert yaml.safe_load((tmp_path / "repo" / "tensorrt_llm" / "1" / "model.yaml").read_text())[
        "triton_config"]["decoupled"] is False
    with LocalTritonServer(tmp_path / "repo", ready_timeout=240, log_file=tmp_path / "tritonserver.log") as srv:
        sequential, concurrent, alone, together = _sequential_and_concurrent(srv, {"sampling_param_max_tokens": 8})
        streamed = _generate(srv, {"text_input": STORIES[0], "sampling_param_max_tokens": 4, "streaming": True})
    assert all(r is not None and r["status"] == 200 and r["text_output"] for r in alone + together), together
    assert concurrent < 0.7 * sequential, f"8 concurrent {concurrent:.1f} s vs 8 sequential {sequential:.1f} s"
    assert "streaming needs triton_config.decoupled: true" in streamed.get("error", ""), streamed


def _cancellations(server) -> int:
    return server.log_path.read_text(errors="replace").count("cancelled after")


@pytest.mark.slow
def test_reference_llmapi_disconnected_client_frees_the_model(server, prompt):
    """A client that drops ``generate_stream`` mid-generation: Triton marks the request cancelled, the engine drops
    its row at the next step, and a short request right after answers promptly."""
    before = _cancellations(server)
    body = {"text_input": "Count from 1 to 1000: 1, 2, 3, 4,", "sampling_param_max_tokens": 5000,
            "streaming": True}  # counting on: it would run to the context limit
    with requests.post(f"{server.url}/v2/models/tensorrt_llm/generate_stream", json=body, stream=True,
                       timeout=60) as r:
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():
            assert b"error" not in line, line
            events += line.startswith(b"data: ")
            if events == 3:
                break
    gone = time.monotonic()
    while _cancellations(server) == before:
        assert time.monotonic() - gone < 10, server.log_tail()
        time.sleep(0.05)
    freed = time.monotonic() - gone
    assert "sampling_param_max_tokens 5000 bounded to" in server.log_path.read_text(errors="replace")
    assert freed < 1.5, f"the abandoned request was dropped only {freed:.2f} s after the client left"
    t0 = time.monotonic()
    assert "Paris" in _generate(server, {"text_input": prompt, "sampling_param_max_tokens": 16})["text_output"]
    assert time.monotonic() - t0 < 15


@pytest.mark.slow
def test_serve_hint_is_the_llmapi_generate_request(server, smollm2, tmp_path, monkeypatch, capsys):
    """``--backend pytorch --reference --serve`` prints a request for tensorrt_llm's generate endpoint (there is
    no ensemble to chat with); that very request answers on the served repository."""
    hint = query_hint(server.url)
    assert hint.startswith(f"curl -s {server.url}/v2/models/tensorrt_llm/generate -d ")
    assert json.loads(hint.split(" -d ", 1)[1].strip("'")) == QUERY_BODY and set(QUERY_BODY) <= set(UPSTREAM_INPUTS)
    out = _generate(server, QUERY_BODY)
    assert out["status"] == 200 and "Paris" in out["text_output"], out

    class Exited:  # a server that has already exited: --serve prints its lines and returns
        url, log_path, running = "http://127.0.0.1:9", tmp_path / "log", False

        def __init__(self, *_a, **_kw):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *_exc):
            return None

        def log_tail(self):
            return ""

    monkeypatch.setattr("nasrt.deploy.triton.server.LocalTritonServer", Exited)
    monkeypatch.setattr(signal, "signal", lambda *_a: None)
    assert cli.main(["triton", "--backend", "pytorch", "--reference", "--model_dir", str(smollm2),
                     "--output_dir", str(tmp_path / "r"), "--serve"]) == 0
    printed = capsys.readouterr().out
    assert f"try: {query_hint(Exited.url)}" in printed and "--chat" not in printed
