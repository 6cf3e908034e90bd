"""``run.py --engine_dir``: generate with a TensorRT-LLM engine, with the reference runtime's flags.

Single-GPU engines run in-process through ``tensorrt_llm.runtime.ModelRunnerCpp`` (``ModelRunner`` with
``--use_py_session``); multi-GPU engines need one MPI rank per engine file, so outside MPI the runner prints (or with
``--launch`` runs) ``mpirun -n <world size> --allow-run-as-root python run.py ...``. The engine dir and the tokenizer
are checked first, so a broken engine dir is reported the same way on any machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nasrt.arch import from_trtllm_config, read_json
from nasrt.deploy.engine import check_engine_path, require_trtllm
from nasrt.errors import CheckpointError, ConfigError, MissingDependencyError
from nasrt.runtime.generate import SamplingConfig
from nasrt.runtime.text import (
    TOKENIZER_FILES,
    check_vocab,
    decode,
    encode_prompts,
    has_tokenizer,
    load_tokenizer,
)

log = logging.getLogger(__name__)

REPO_RUN_PY = Path(__file__).resolve().parents[3] / "run.py"
#: ``run`` arguments forwarded to every MPI rank, in order (``launch`` is not: the ranks must not relaunch).
FORWARDED = ("engine_dir", "tokenizer_dir", "input_text", "input_file", "max_output_len", "max_input_length",
             "temperature", "top_k", "top_p", "num_beams", "seed", "end_id", "pad_id", "stop_words", "chat",
             "streaming", "use_py_session", "kv_cache_free_gpu_memory_fraction")
#: Boolean flags whose ``False`` must be spelled out (``argparse.BooleanOptionalAction`` with default True).
NEGATABLE = ("streaming",)


def validate_engine_dir(engine_dir: str | Path) -> dict[str, Any]:
    """``config.json`` with ``pretrained_config`` and ``build_config``, and every ``rank{N}.engine``."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise CheckpointError(f"--engine_dir {engine_dir}: directory not found")
    cfg_path = engine_dir / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"--engine_dir {engine_dir}: config.json missing (not a trtllm-build output)")
    cfg = read_json(cfg_path)
    for key in ("pretrained_config", "build_config"):
        if not isinstance(cfg.get(key), dict):
            raise CheckpointError(f"{cfg_path}: no {key!r} section (not an engine config; a checkpoint dir?)")
    mapping = cfg["pretrained_config"].get("mapping") or {}
    world = int(mapping.get("world_size") or int(mapping.get("tp_size", 1)) * int(mapping.get("pp_size", 1)))
    missing = [f"rank{r}.engine" for r in range(world) if not (engine_dir / f"rank{r}.engine").is_file()]
    if missing:
        raise CheckpointError(f"--engine_dir {engine_dir}: missing engine file(s) {', '.join(missing)} "
                              f"(config.json mapping says world_size {world})")
    return cfg


def world_size(cfg: dict[str, Any]) -> int:
    m = cfg["pretrained_config"].get("mapping") or {}
    return int(m.get("world_size") or int(m.get("tp_size", 1)) * int(m.get("pp_size", 1)))


def mpi_world() -> int | None:
    """The MPI world size when running under mpirun, else None."""
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if os.environ.get(var):
            return int(os.environ[var])
    return None


def forward_argv(args: argparse.Namespace) -> list[str]:
    """The ``run`` flags of ``args`` as a command line (None / False omitted, lists expanded)."""
    out: list[str] = []
    for name in FORWARDED:
        value = getattr(args, name, None)
        if value is False and name in NEGATABLE:
            out.append(f"--no-{name}")
            continue
        if value is None or value is False:
            continue
        if value is True:
            out.append(f"--{name}")
        elif isinstance(value, (list, tuple)):
            out += [f"--{name}", *map(str, value)]
        else:
            out += [f"--{name}", str(value)]
    return out


def mpirun_argv(args: argparse.Namespace, world: int) -> list[str]:
    """``mpirun -n <world> --allow-run-as-root python run.py ...`` (``python -m nasrt run`` without run.py)."""
    script = [str(REPO_RUN_PY)] if REPO_RUN_PY.is_file() else ["-m", "nasrt", "run"]
    return ["mpirun", "-n", str(world), "--allow-run-as-root", sys.executable, *script, *forward_argv(args)]


def read_prompts(args: argparse.Namespace) -> list[str]:
    """``--input_text`` prompts, or one prompt per non-empty line of ``--input_file`` (.txt)."""
    texts = list(getattr(args, "input_text", None) or [])
    path = getattr(args, "input_file", None)
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--input_file {p}: file not found")
        if p.suffix not in ("", ".txt"):
            raise ConfigError(f"--input_file {p}: only text files (one prompt per line) are read")
        texts += [line for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ConfigError("no prompt: pass --input_text or --input_file")
    return texts


def check_limits(build: dict[str, Any], prompts: list[list[int]], max_output_len: int, num_beams: int) -> None:
    """Runtime requests must stay inside the engine's build-time limits."""
    limits = {k: build.get(k) for k in ("max_batch_size", "max_input_len", "max_seq_len", "max_beam_width")}
    if limits["max_batch_size"] and len(prompts) > limits["max_batch_size"]:
        raise ConfigError(f"{len(prompts)} prompts exceed the engine's max_batch_size {limits['max_batch_size']}")
    longest = max(len(p) for p in prompts)
    if limits["max_input_len"] and longest > limits["max_input_len"]:
        raise ConfigError(f"a prompt of {longest} tokens exceeds the engine's max_input_len {limits['max_input_len']}")
    if limits["max_seq_len"] and longest + max_output_len > limits["max_seq_len"]:
        raise ConfigError(f"prompt {longest} + --max_output_len {max_output_len} tokens exceed the engine's "
                          f"max_seq_len {limits['max_seq_len']}")
    if limits["max_beam_width"] and num_beams > limits["max_beam_width"]:
        raise ConfigError(f"--num_beams {num_beams} exceeds the engine's max_beam_width {limits['max_beam_width']}")


def _sampling(args: argparse.Namespace, tokenizer: Any, pretrained: dict[str, Any]) -> SamplingConfig:
    stop = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (getattr(args, "stop_words", None) or [])]
    end = args.end_id if getattr(args, "end_id", None) is not None else pretrained.get("eos_token_id")
    if end is None:
        end = tokenizer.eos_token_id
    cfg = SamplingConfig(max_new_tokens=args.max_output_len, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=getattr(args, "seed", None), end_id=end,
                         pad_id=getattr(args, "pad_id", None), stop_words=stop or None)
    cfg.validate()
    return cfg


def run_engine(args: argparse.Namespace) -> int:
    """Entry point of ``run.py --engine_dir``; returns the exit status."""
    check_engine_path("run.py --engine_dir")  # a release without the engine path: stop before anything else
    cfg = validate_engine_dir(args.engine_dir)
    world = world_size(cfg)
    if not getattr(args, "tokenizer_dir", None):
        raise ConfigError("--engine_dir needs --tokenizer_dir (the HF model dir with the tokenizer files)")
    if not has_tokenizer(args.tokenizer_dir):
        raise ConfigError(f"--tokenizer_dir {args.tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    if world > 1 and mpi_world() != world:
        cmd = mpirun_argv(args, world)
        if not getattr(args, "launch", False):
            print(f"this engine has {world} ranks; run it with one MPI process per GPU (or add --launch):")
            print(shlex.join(cmd))
            return 0
        if shutil.which("mpirun") is None:
            raise MissingDependencyError("--launch needs mpirun (Open MPI) on PATH, as TensorRT-LLM's container has")
        require_trtllm("run.py --engine_dir", f"{world} GPUs")
        return subprocess.run(cmd, check=False).returncode
    require_trtllm("run.py --engine_dir", f"{world} CUDA GPU(s) of the kind the engine was built for")
    return _generate(args, cfg)


@dataclass
class EngineRequest:
    """Everything one ``run.py --engine_dir`` call passes to TensorRT-LLM (built without TensorRT-LLM)."""

    texts: list[str]
    prompts: list[list[int]]
    runner_kwargs: dict[str, Any]
    generate_kwargs: dict[str, Any] = field(repr=False)  # batch_input_ids added at run time (torch int32)
    use_py_session: bool = False
    streaming: bool = False


def prepare_request(args: argparse.Namespace, cfg: dict[str, Any], tokenizer: Any, rank: int = 0) -> EngineRequest:
    """Prompts, sampling and runner settings from the ``run`` flags, checked against the engine's limits."""
    sampling = _sampling(args, tokenizer, cfg["pretrained_config"])
    texts = read_prompts(args)
    prompts = encode_prompts(tokenizer, texts, chat=bool(getattr(args, "chat", False)))
    check_vocab(tokenizer, from_trtllm_config(cfg["pretrained_config"]))
    if getattr(args, "max_input_length", None):
        prompts = [p[-args.max_input_length:] for p in prompts]
    num_beams = int(getattr(args, "num_beams", 1) or 1)
    check_limits(cfg["build_config"], prompts, args.max_output_len, num_beams)
    ends = sampling.end_id if isinstance(sampling.end_id, (list, tuple)) else [sampling.end_id]
    if ends[0] is None:
        raise ConfigError("no end id: pass --end_id (the engine config and tokenizer name no EOS token)")
    end_id = int(ends[0])
    pad_id = sampling.pad_id if sampling.pad_id is not None else tokenizer.pad_token_id
    pad_id = end_id if pad_id is None else int(pad_id)
    # the runtime takes one end id; further EOS ids become single-token stop words
    words = [[int(e)] for e in ends[1:]] + list(sampling.stop_words or [])
    use_py = bool(getattr(args, "use_py_session", False))
    runner_kwargs: dict[str, Any] = {"engine_dir": str(args.engine_dir), "rank": rank,
                                     "max_output_len": args.max_output_len}
    if not use_py:
        runner_kwargs.update(max_batch_size=len(prompts), max_input_len=max(len(p) for p in prompts),
                             max_beam_width=num_beams,
                             kv_cache_free_gpu_memory_fraction=float(
                                 getattr(args, "kv_cache_free_gpu_memory_fraction", None) or 0.9))
    streaming = bool(getattr(args, "streaming", False)) and len(prompts) == 1 and num_beams == 1
    gen = {"max_new_tokens": args.max_output_len, "end_id": end_id, "pad_id": pad_id,
           "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
           "num_beams": num_beams, "random_seed": sampling.seed,
           "stop_words_list": [list(words) for _ in prompts] if words else None, "streaming": streaming,
           "output_sequence_lengths": True, "return_dict": True}
    return EngineRequest(texts, prompts, runner_kwargs, gen, use_py, streaming)


def _generate(args: argparse.Namespace, cfg: dict[str, Any]) -> int:  # pragma: no cover - needs TensorRT-LLM
    import tensorrt_llm
    import torch
    from tensorrt_llm.runtime import ModelRunner, ModelRunnerCpp

    rank = tensorrt_llm.mpi_rank()
    tokenizer = load_tokenizer(args.tokenizer_dir)
    req = prepare_request(args, cfg, tokenizer, rank)
    runner_cls = ModelRunner if req.use_py_session else ModelRunnerCpp
    runner = runner_cls.from_dir(**req.runner_kwargs)
    batch = [torch.tensor(p, dtype=torch.int32) for p in req.prompts]
    outputs = runner.generate(batch_input_ids=batch, **req.generate_kwargs)
    torch.cuda.synchronize()
    return print_outputs(req, outputs, tokenizer, rank)


def print_outputs(req: EngineRequest, outputs: Any, tokenizer: Any, rank: int = 0) -> int:
    """Print like the reference runtime: ``Input: "..."`` / ``Output: "..."`` (streamed for one prompt)."""
    texts, prompts = req.texts, req.prompts
    num_beams = req.generate_kwargs["num_beams"]
    streaming = req.streaming
    if streaming:  # same output shape as the reference runtime: Input: "..." / Output: "..." printed as it grows
        printed = ""
        final = None
        if rank == 0:
            print(f'Input: "{texts[0]}"\nOutput: "', end="", flush=True)
        for step in outputs:
            final = step
            end = int(step["sequence_lengths"][0][0])
            text = decode(tokenizer, step["output_ids"][0][0][len(prompts[0]):end].tolist())
            if rank == 0 and text.startswith(printed) and not text.endswith("\ufffd"):
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
        if rank == 0 and final is not None:
            end = int(final["sequence_lengths"][0][0])
            text = decode(tokenizer, final["output_ids"][0][0][len(prompts[0]):end].tolist())
            print(f'{text[len(printed):] if text.startswith(printed) else ""}"', flush=True)
        return 0
    if rank != 0:
        return 0
    for b, (prompt, ids) in enumerate(zip(texts, prompts, strict=True)):
        print(f'Input: "{prompt}"')
        for beam in range(num_beams):
            end = int(outputs["sequence_lengths"][b][beam])
            label = "Output" if num_beams == 1 else f"Output [beam {beam}]"
            print(f'{label}: "{decode(tokenizer, outputs["output_ids"][b][beam][len(ids):end].tolist())}"')
    return 0
