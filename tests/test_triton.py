"""Triton model repository: configs checked with Triton's own protobuf, ensemble wiring, limits, errors, launch
command, and the Python models' logic. No server here (see test_triton_server.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from nasrt import cli
from nasrt.arch import load_spec
from nasrt.convert import ConvertOptions, convert_checkpoint
from nasrt.deploy.triton.client import build_payload, generate
from nasrt.deploy.triton.launch import launch_command
from nasrt.deploy.triton.models.postprocessing import Postprocessor
from nasrt.deploy.triton.models.preprocessing import Preprocessor, to_word_list
from nasrt.deploy.triton.models.reference_llm import from_word_list, output_arrays, parse_request
from nasrt.deploy.triton.repository import (
    RECORD,
    ServingOptions,
    read_engine,
    write_engine_repository,
    write_reference_repository,
)
from nasrt.deploy.triton.server import free_ports
from nasrt.errors import CheckpointError, ConfigError, NasrtError, OutputExistsError
from nasrt.fixtures import write_config_only
from nasrt.sharding import Mapping

MODELS = ("ensemble", "preprocessing", "tensorrt_llm", "postprocessing")
BUILD = {"max_batch_size": 16, "max_input_len": 3072, "max_seq_len": 4096, "max_num_tokens": 8192,
         "max_beam_width": 1, "kv_cache_type": "paged",
         "plugin_config": {"gpt_attention_plugin": "auto", "remove_input_padding": True, "paged_kv_cache": True}}


def make_engine_dir(root: Path, tp: int = 2, pp: int = 1, build: dict | None = None) -> Path:
    """An engine dir as trtllm-build lays it out (51B config, placeholder rank files: nothing here loads them)."""
    spec = load_spec(write_config_only("nemotron-51b", root / "hf51b"))
    eng = root / f"engine_tp{tp}pp{pp}"
    eng.mkdir()
    cfg = {"version": "1.2.1", "pretrained_config": spec.to_trtllm_config("bfloat16", Mapping(tp, pp).to_dict()),
           "build_config": dict(BUILD if build is None else build)}
    (eng / "config.json").write_text(json.dumps(cfg))
    for r in range(tp * pp):
        (eng / f"rank{r}.engine").write_bytes(b"placeholder")
    return eng


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def dtype_name(code: int) -> str:
    return model_config_pb2.DataType.Name(code)


@pytest.fixture(scope="module")
def repos(tmp_path_factory, smollm2, synthetic) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("triton_repos")
    eng = make_engine_dir(root)
    ckpt = convert_checkpoint(synthetic, root / "ckpt", ConvertOptions(dtype="bfloat16"))
    return {
        "engine": write_engine_repository(eng, smollm2, root / "repo_engine"),
        "reference": write_reference_repository(ckpt, smollm2, root / "repo_ref"),
        "engine_dir": eng,
        "ckpt": Path(ckpt),
    }


# ---- configs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["engine", "reference"])
def test_every_config_parses_with_triton_protobuf(repos, variant):
    repo = repos[variant]
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == sorted(MODELS)
    for name in MODELS:
        text = (repo / name / "config.pbtxt").read_text()
        assert "${" not in text, f"{name}: unfilled placeholder"
        cfg = parse(repo / name / "config.pbtxt")
        assert cfg.name == name
        assert (repo / name / "1").is_dir()
    assert parse(repo / "ensemble" / "config.pbtxt").platform == "ensemble"
    assert parse(repo / "tensorrt_llm" / "config.pbtxt").backend == ("tensorrtllm" if variant == "engine" else "python")


def test_a_misspelled_field_fails_the_parse(repos):
    text = (repos["engine"] / "tensorrt_llm" / "config.pbtxt").read_text()
    assert "data_type:" in text
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text.replace("data_type:", "datatype:", 1), model_config_pb2.ModelConfig())
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text.replace("TYPE_INT32", "TYPE_INT23", 1), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("variant", ["engine", "reference"])
def test_ensemble_steps_map_existing_tensors_with_matching_types(repos, variant):
    repo = repos[variant]
    ens = parse(repo / "ensemble" / "config.pbtxt")
    tensors = {t.name: (t.data_type, t.optional) for t in ens.input}  # ensemble tensor -> (type, optional)
    for step in ens.ensemble_scheduling.step:
        model = parse(repo / step.model_name / "config.pbtxt")
        inputs = {t.name: t for t in model.input}
        outputs = {t.name: t for t in model.output}
        for model_input, tensor in step.input_map.items():
            assert model_input in inputs, f"{step.model_name} has no input {model_input!r}"
            assert tensor in tensors, f"{step.model_name}.{model_input} <- {tensor!r}: produced by nobody earlier"
            assert inputs[model_input].data_type == tensors[tensor][0], (
                f"{step.model_name}.{model_input} is {dtype_name(inputs[model_input].data_type)}, "
                f"{tensor} is {dtype_name(tensors[tensor][0])}")
            if not inputs[model_input].optional:
                assert not tensors[tensor][1], f"required {step.model_name}.{model_input} fed by optional {tensor}"
        required = {n for n, t in inputs.items() if not t.optional}
        assert required <= set(step.input_map), f"{step.model_name}: unmapped required inputs"
        for model_output, tensor in step.output_map.items():
            assert model_output in outputs, f"{step.model_name} has no output {model_output!r}"
            tensors[tensor] = (outputs[model_output].data_type, False)
    for out in ens.output:
        assert out.name in tensors and tensors[out.name][0] == out.data_type
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["preprocessing", "tensorrt_llm", "postprocessing"]


def test_reference_llm_has_identical_inputs_and_outputs(repos):
    real = parse(repos["engine"] / "tensorrt_llm" / "config.pbtxt")
    ref = parse(repos["reference"] / "tensorrt_llm" / "config.pbtxt")
    assert list(real.input) == list(ref.input)
    assert list(real.output) == list(ref.output)
    assert real.model_transaction_policy.decoupled and ref.model_transaction_policy.decoupled
    names = {t.name for t in real.input}
    assert {"input_ids", "input_lengths", "request_output_len", "streaming", "min_tokens", "seed"} <= names
    assert not {"min_length", "random_seed"} & names  # renamed after tensorrtllm_backend v0.19.0


def test_engine_limits_and_parameters(repos):
    repo, eng = repos["engine"], repos["engine_dir"]
    llm = parse(repo / "tensorrt_llm" / "config.pbtxt")
    params = {k: v.string_value for k, v in llm.parameters.items()}
    assert params["gpt_model_path"] == str(eng.resolve())
    assert params["gpt_model_type"] == "inflight_fused_batching"
    assert float(params["kv_cache_free_gpu_mem_fraction"]) == 0.9
    assert params["max_beam_width"] == str(BUILD["max_beam_width"])
    assert params["exclude_input_in_output"] == "true"
    for name in MODELS:  # batch limits consistent with the engine's build_config
        assert parse(repo / name / "config.pbtxt").max_batch_size == BUILD["max_batch_size"]
    assert list(llm.dynamic_batching.preferred_batch_size) == [BUILD["max_batch_size"]]
    pre = {k: v.string_value for k, v in parse(repo / "preprocessing" / "config.pbtxt").parameters.items()}
    assert int(pre["max_input_len"]) == BUILD["max_input_len"] and int(pre["max_seq_len"]) == BUILD["max_seq_len"]
    record = json.loads((repo / RECORD).read_text())
    assert record["world_size"] == 2 and record["launch"].startswith("mpirun --allow-run-as-root -n 1 ")
    assert record["build"] is None  # this engine was not built by `nasrt build` (no nasrt_build.json)


def test_record_keeps_the_engines_build_record(repos, smollm2, tmp_path):
    from nasrt.deploy.engine.build import RECORD_NAME

    eng = tmp_path / "eng"
    shutil.copytree(repos["engine_dir"], eng)
    build = {"profile": {"name": "h100x2-bf16"}, "nasrt_version": "0.1.0"}
    (eng / RECORD_NAME).write_text(json.dumps(build))
    repo = write_engine_repository(eng, smollm2, tmp_path / "r")
    assert json.loads((repo / RECORD).read_text())["build"] == build


def test_tokenizer_dir_and_options_reach_the_models(repos, smollm2, tmp_path):
    for name in ("preprocessing", "postprocessing"):
        params = parse(repos["engine"] / name / "config.pbtxt").parameters
        assert params["tokenizer_dir"].string_value == str(smollm2.resolve())
    repo = write_engine_repository(repos["engine_dir"], smollm2, tmp_path / "r",
                                   ServingOptions(max_batch_size=4, decoupled=False,
                                                  kv_cache_free_gpu_mem_fraction=0.5,
                                                  max_tokens_in_paged_kv_cache=65536))
    llm = parse(repo / "tensorrt_llm" / "config.pbtxt")
    assert llm.max_batch_size == 4 and not llm.model_transaction_policy.decoupled
    assert llm.parameters["kv_cache_free_gpu_mem_fraction"].string_value == "0.5"
    assert llm.parameters["max_tokens_in_paged_kv_cache"].string_value == "65536"


def test_python_models_are_this_projects_sources(repos):
    models = Path(__file__).parents[1] / "nasrt" / "deploy" / "triton" / "models"
    for name in ("preprocessing", "postprocessing"):
        for variant in ("engine", "reference"):
            assert (repos[variant] / name / "1" / "model.py").read_text() == (models / f"{name}.py").read_text()
        source = (models / f"{name}.py").read_text()  # runs in a serving container without nasrt installed
        assert "import nasrt" not in source and "from nasrt" not in source
    assert not (repos["engine"] / "tensorrt_llm" / "1" / "model.py").exists()
    shim = (repos["reference"] / "tensorrt_llm" / "1" / "model.py").read_text()
    assert "nasrt.deploy.triton.models.reference_llm import TritonPythonModel" in shim
    params = parse(repos["reference"] / "tensorrt_llm" / "config.pbtxt").parameters
    assert params["checkpoint_dir"].string_value == str(repos["ckpt"].resolve())


# ---- errors ---------------------------------------------------------------------------------------------------
def test_engine_dir_missing_rank_files(repos, smollm2, tmp_path):
    eng = tmp_path / "eng"
    shutil.copytree(repos["engine_dir"], eng)
    (eng / "rank1.engine").unlink()
    with pytest.raises(CheckpointError, match=r"missing engine file\(s\) rank1\.engine"):
        read_engine(eng)
    with pytest.raises(CheckpointError, match="rank1.engine"):
        write_engine_repository(eng, smollm2, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_tokenizer_dir_without_tokenizer_files(repos, tmp_path):
    empty = tmp_path / "tok"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"--tokenizer_dir .*tok: no tokenizer files"):
        write_engine_repository(repos["engine_dir"], empty, tmp_path / "r")
    with pytest.raises(ConfigError, match="no tokenizer files"):
        write_reference_repository(repos["ckpt"], empty, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_other_bad_inputs(repos, smollm2, tmp_path):
    with pytest.raises(ConfigError, match="exceeds the engine's build-time max_batch_size 16"):
        write_engine_repository(repos["engine_dir"], smollm2, tmp_path / "r", ServingOptions(max_batch_size=32))
    with pytest.raises(NasrtError, match="not an engine config"):
        read_engine(repos["ckpt"])  # a checkpoint dir is not an engine dir
    with pytest.raises(ConfigError, match="this is an engine dir"):
        write_reference_repository(repos["engine_dir"], smollm2, tmp_path / "r")
    with pytest.raises(ConfigError, match="kv_cache_free_gpu_mem_fraction"):
        write_engine_repository(repos["engine_dir"], smollm2, tmp_path / "r",
                                ServingOptions(kv_cache_free_gpu_mem_fraction=1.5))
    no_seq = {k: v for k, v in BUILD.items() if k != "max_seq_len"}
    (tmp_path / "e").mkdir()
    with pytest.raises(ConfigError, match=r"build_config\.max_seq_len is missing"):
        read_engine(make_engine_dir(tmp_path / "e", tp=1, build=no_seq))
    with pytest.raises(OutputExistsError):
        write_engine_repository(repos["engine_dir"], smollm2, repos["engine"])
    with pytest.raises(ConfigError, match="--device 'tpu9'"):
        write_reference_repository(repos["ckpt"], smollm2, tmp_path / "r", device="tpu9")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(repos["ckpt"], ckpt)
    (ckpt / "rank0.safetensors").unlink()
    with pytest.raises(CheckpointError, match="rank0.safetensors"):
        write_reference_repository(ckpt, smollm2, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_cli_prints_launch_and_reports_errors(repos, smollm2, tmp_path, capsys):
    rc = cli.main(["triton", "--engine_dir", str(repos["engine_dir"]), "--tokenizer_dir", str(smollm2),
                   "--output_dir", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert rc == 0 and (tmp_path / "r" / "ensemble" / "config.pbtxt").is_file()
    assert "mpirun --allow-run-as-root -n 1" in out and "--world_size=2" in out
    eng = tmp_path / "eng"
    shutil.copytree(repos["engine_dir"], eng)
    (eng / "rank0.engine").unlink()
    rc = cli.main(["triton", "--engine_dir", str(eng), "--tokenizer_dir", str(smollm2),
                   "--output_dir", str(tmp_path / "r2")])
    err = capsys.readouterr().err
    assert rc == 2 and "nasrt triton: error:" in err and "rank0.engine" in err
    rc = cli.main(["triton", "--engine_dir", str(repos["engine_dir"]), "--tokenizer_dir", str(smollm2),
                   "--output_dir", str(tmp_path / "r3"), "--serve"])
    assert rc == 2 and "--reference" in capsys.readouterr().err


# ---- issue 8: what the C++ tensorrtllm backend reads unconditionally, and `nasrt check` of repositories ---------
#: Parameters ``triton_backend/inflight_batcher_llm/src/model_instance_state.cc`` (TensorRT-LLM 1.x) reads with
#: ``GetParameter`` outside a try (a missing one: "Cannot find parameter with name: ..."), plus ``gpt_model_path``
#: (read in a try, but a decoder-only model without it fails: "Both encoder and decoder model paths are empty").
UNCONDITIONAL = {"gpt_model_type", "tokenizer_dir", "xgrammar_tokenizer_info_path", "guided_decoding_backend",
                 "gpt_model_path"}


def test_engine_model_carries_every_unconditional_parameter(repos, smollm2):
    from nasrt.deploy.check import trtllm_schema

    assert set(trtllm_schema.TRITON_REQUIRED) == UNCONDITIONAL
    llm = parse(repos["engine"] / "tensorrt_llm" / "config.pbtxt")  # Triton's own ModelConfig protobuf
    params = {k: v.string_value for k, v in llm.parameters.items()}
    missing = UNCONDITIONAL - set(params)
    assert not missing, f"the backend would fail to load: Cannot find parameter with name: {sorted(missing)}"
    assert all("${" not in v for v in params.values())
    assert params["tokenizer_dir"] == str(smollm2.resolve())
    assert params["guided_decoding_backend"] == "" and params["xgrammar_tokenizer_info_path"] == ""
    assert "worker_path" not in params


@pytest.mark.parametrize("variant", ["engine", "reference"])
def test_generated_repositories_pass_nasrt_check(repos, variant, capsys):
    assert cli.main(["check", str(repos[variant])]) == 0
    assert "triton OK" in capsys.readouterr().out
    assert cli.main(["check", str(repos["engine_dir"])]) == 0


def _planted_repo(repos, tmp_path, edit) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(repos["engine"], repo)
    path = repo / "tensorrt_llm" / "config.pbtxt"
    path.write_text(edit(path.read_text()))
    return repo


def test_check_catches_unfilled_placeholder(repos, tmp_path, capsys):
    repo = _planted_repo(repos, tmp_path, lambda t: t.replace('string_value: "0.9"',
                                                              'string_value: "${kv_cache_free_gpu_mem_fraction}"'))
    assert cli.main(["check", str(repo)]) == 2
    out = capsys.readouterr().out
    assert "parameters.kv_cache_free_gpu_mem_fraction: unfilled placeholder ${kv_cache_free_gpu_mem_fraction}" in out


def test_check_catches_missing_tokenizer_dir(repos, tmp_path, capsys):
    def drop(text: str) -> str:
        blocks = text.split("parameters {")
        kept = [b for b in blocks[1:] if 'key: "tokenizer_dir"' not in b]
        assert len(kept) == len(blocks) - 2
        return "parameters {".join([blocks[0], *kept])

    repo = _planted_repo(repos, tmp_path, drop)
    parse(repo / "tensorrt_llm" / "config.pbtxt")  # still a valid ModelConfig: only the backend fails
    assert cli.main(["check", str(repo)]) == 2
    out = capsys.readouterr().out
    assert "tensorrt_llm/config.pbtxt: parameters.tokenizer_dir: missing" in out
    assert "Cannot find parameter with name: tokenizer_dir" in out


def test_check_catches_wiring_and_batch_limits(repos, tmp_path, capsys):
    repo = tmp_path / "repo"
    shutil.copytree(repos["engine"], repo)
    ens = repo / "ensemble" / "config.pbtxt"
    ens.write_text(ens.read_text().replace('key: "input_lengths"', 'key: "input_length"'))
    llm = repo / "tensorrt_llm" / "config.pbtxt"
    llm.write_text(llm.read_text().replace(f"max_batch_size: {BUILD['max_batch_size']}", "max_batch_size: 64"))
    assert cli.main(["check", str(repo), "--json"]) == 2
    found = {(Path(p["where"]).parent.name, p["what"]) for p in json.loads(capsys.readouterr().out)["problems"]}
    assert ("ensemble", "ensemble_scheduling.step[1] (tensorrt_llm).input_map.input_length") in found
    assert ("ensemble", "ensemble_scheduling.step[1] (tensorrt_llm).input_map") in found  # input_lengths unmapped
    assert ("tensorrt_llm", "max_batch_size") in found  # 64 > the engine's 16


def test_check_catches_an_empty_engine_file(repos, tmp_path, capsys):
    eng = tmp_path / "eng"
    shutil.copytree(repos["engine_dir"], eng)
    (eng / "rank1.engine").write_bytes(b"")
    assert cli.main(["check", str(eng)]) == 2
    assert "rank1.engine: empty engine file" in capsys.readouterr().out


def test_launch_script_command_is_absolute(tmp_path, monkeypatch):
    from nasrt.deploy.triton.launch import launch_script_command

    monkeypatch.delenv("TRITON_TRTLLM_LAUNCH_SCRIPT", raising=False)
    argv = launch_script_command(Path("repo"), 2)
    assert argv[1] == "/app/scripts/launch_triton_server.py" and Path(argv[1]).is_absolute()
    assert Path(argv[3].split("=", 1)[1]).is_absolute() and argv[2] == "--world_size=2"
    monkeypatch.setenv("TRITON_TRTLLM_LAUNCH_SCRIPT", "scripts/launch_triton_server.py")
    assert launch_script_command(tmp_path, 1)[1] == str(Path("scripts/launch_triton_server.py").resolve())


# ---- launch command -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 4])
def test_launch_command_has_one_process_per_rank(world, tmp_path):
    argv = launch_command(tmp_path, world)
    if world == 1:
        assert argv[0].endswith("tritonserver") and "mpirun" not in argv
        assert f"--model-repository={tmp_path}" in argv
        return
    assert argv[:2] == ["mpirun", "--allow-run-as-root"]
    segments = " ".join(argv[2:]).split(" : ")
    assert len(segments) == world
    for rank, seg in enumerate(segments):
        assert seg.startswith("-n 1 ") and f"--model-repository={tmp_path}" in seg
        assert f"shm-region-prefix-name=prefix{rank}_" in seg
        assert ("--load-model=tensorrt_llm" in seg) == (rank > 0)


# ---- the Python models' logic --------------------------------------------------------------------------------
def test_preprocessing_matches_the_runtime_encoding(smollm2):
    from nasrt.runtime.text import encode_prompts, load_tokenizer

    pre = Preprocessor(str(smollm2), max_input_len=64, max_seq_len=80)
    tok = load_tokenizer(smollm2)
    q = "What is the capital of France?"
    out = pre(np.array([q.encode(), b"Hi"], dtype=object), [8, 8], chat=[True, False],
              stop=np.array([[b"Paris", b""], [b"", b""]], dtype=object))
    chat_ids = encode_prompts(tok, [q], chat=True)[0]
    assert out["REQUEST_INPUT_LEN"].tolist() == [[len(chat_ids)], [len(encode_prompts(tok, ["Hi"])[0])]]
    assert out["INPUT_ID"][0].tolist() == chat_ids and out["INPUT_ID"].dtype == np.int32
    assert out["OUT_END_ID"].tolist() == [[tok.eos_token_id]] * 2
    paris = tok.encode("Paris", add_special_tokens=False)
    assert from_word_list(out["STOP_WORDS_IDS"][0]) == [paris] and from_word_list(out["STOP_WORDS_IDS"][1]) == []
    with pytest.raises(ValueError, match="max_seq_len 80"):
        pre([q.encode()], [70], chat=[True])
    with pytest.raises(ValueError, match="max_input_len is 64"):
        pre([("word " * 100).encode()], [1])


def test_word_list_round_trip():
    lists = [[[5, 6], [7]], []]
    arr = to_word_list(lists)
    assert arr.shape == (2, 2, 3)
    assert arr[0].tolist() == [[5, 6, 7], [2, 3, -1]]
    assert from_word_list(arr[0]) == [[5, 6], [7]] and from_word_list(arr[1]) == []


def test_postprocessing_decodes_sequence_length_tokens(smollm2):
    post = Postprocessor(str(smollm2))
    ids = post.tokenizer.encode(" Paris is nice", add_special_tokens=False)
    tokens = np.array([[ids + [0, 0]]], dtype=np.int32)
    text = post(tokens, np.array([[2]], dtype=np.int32))
    assert text.shape == (1, 1)
    assert text[0, 0].decode() == post.tokenizer.decode(ids[:2])


def _getter(**inputs):
    return lambda name: (np.asarray(inputs[name]) if name in inputs else None)


def test_reference_request_parsing():
    base = {"input_ids": [[5, 6, 7, 0]], "input_lengths": [3], "request_output_len": [4]}
    req = parse_request(_getter(**base))
    assert req.prompts == [[5, 6, 7]] and req.max_new_tokens == 4 and req.top_k == 1 and not req.streaming
    assert parse_request(_getter(**base, runtime_top_p=[0.9])).top_k == 0  # TRT-LLM: top_k 0 + top_p = nucleus
    stop = to_word_list([[[9], [3, 4]]])
    assert parse_request(_getter(**base, stop_words_list=stop)).stop_words == [[9], [3, 4]]
    with pytest.raises(ValueError, match="beam_width=2 is not supported"):
        parse_request(_getter(**base, beam_width=[2]))
    with pytest.raises(ValueError, match="repetition_penalty"):
        parse_request(_getter(**base, repetition_penalty=[1.2]))
    with pytest.raises(ValueError, match="bad_words"):
        parse_request(_getter(**base, bad_words_list=stop))
    with pytest.raises(ValueError, match="request_output_len"):
        parse_request(_getter(**{**base, "request_output_len": [0]}))
    req = parse_request(_getter(**base, exclude_input_in_output=[False], end_id=[2]))
    arrays = output_arrays(req, [[8, 9]])
    assert arrays["output_ids"].tolist() == [[[5, 6, 7, 8, 9]]] and arrays["sequence_length"].tolist() == [[5]]


# ---- client ----------------------------------------------------------------------------------------------------
def test_client_payload_and_unreachable_server():
    payload = build_payload("hi", 8, stream=True, chat=True, params={"top_k": 1, "seed": None})
    assert payload == {"text_input": "hi", "max_tokens": 8, "top_k": 1, "apply_chat_template": True, "stream": True}
    with pytest.raises(NasrtError, match="max_tokens"):
        build_payload("hi", 0)
    port = free_ports(1)[0]
    with pytest.raises(NasrtError, match="cannot reach Triton"):
        generate(f"http://127.0.0.1:{port}", "hi", 4, timeout=5)
