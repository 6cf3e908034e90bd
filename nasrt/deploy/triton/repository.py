"""Write a Triton model repository: ``ensemble`` -> ``preprocessing`` -> ``tensorrt_llm`` -> ``postprocessing``.

Two variants share every model but ``tensorrt_llm``:

* engine (:func:`write_engine_repository`): the C++ ``tensorrtllm`` backend serving a TensorRT-LLM engine
  (``gpt_model_path``, in-flight batching, KV-cache fraction, ``decoupled`` for streaming); batch and length limits
  are read from the engine's ``build_config``.
* reference (:func:`write_reference_repository`): a Python-backend model with the identical inputs and outputs that
  answers with nasrt's CPU reference runtime from a checkpoint dir, for machines without a GPU.

The repository is written atomically; ``nasrt_repository.json`` at its root records what it was made from.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nasrt
from nasrt.arch import read_json
from nasrt.atomic import atomic_output_dir, write_json
from nasrt.deploy.triton import signatures as sig
from nasrt.deploy.triton.launch import format_command, launch_command
from nasrt.deploy.triton.pbtxt import ModelConfig
from nasrt.errors import CheckpointError, ConfigError, NasrtError
from nasrt.sharding import Mapping

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).parent / "models"
RECORD = "nasrt_repository.json"
#: Python models that load a tokenizer, and the module they load it with (copied beside their model.py).
TOKENIZER_MODELS = ("preprocessing", "postprocessing")
TOKENIZER_SOURCE = Path(__file__).resolve().parents[2] / "tokenizer.py"
EXECUTOR_WORKER = "/opt/tritonserver/backends/tensorrtllm/trtllmExecutorWorker"


@dataclass(frozen=True)
class EngineInfo:
    """What the repository needs from an engine dir's ``config.json``."""

    engine_dir: Path
    tp_size: int
    pp_size: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int | None
    max_beam_width: int

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size


@dataclass(frozen=True)
class ServingOptions:
    """Knobs of the generated repository (defaults follow tensorrtllm_backend's documented values)."""

    max_batch_size: int | None = None  # None: the engine's build-time max_batch_size
    decoupled: bool = True
    kv_cache_free_gpu_mem_fraction: float = 0.9
    max_tokens_in_paged_kv_cache: int | None = None
    batch_scheduler_policy: str = "guaranteed_no_evict"
    enable_kv_cache_reuse: bool = False
    exclude_input_in_output: bool = True
    preprocessing_instances: int = 1
    postprocessing_instances: int = 1
    max_queue_delay_us: int = 0

    def check(self) -> None:
        if not 0.0 < self.kv_cache_free_gpu_mem_fraction <= 1.0:
            raise ConfigError(f"--kv_cache_free_gpu_mem_fraction must be in (0, 1], got "
                              f"{self.kv_cache_free_gpu_mem_fraction}")
        if self.batch_scheduler_policy not in ("guaranteed_no_evict", "max_utilization"):
            raise ConfigError(f"--batch_scheduler_policy {self.batch_scheduler_policy!r}: use guaranteed_no_evict "
                              "or max_utilization")
        for flag in ("preprocessing_instances", "postprocessing_instances"):
            if getattr(self, flag) < 1:
                raise ConfigError(f"--{flag} must be at least 1")
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ConfigError(f"--max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.max_tokens_in_paged_kv_cache is not None and self.max_tokens_in_paged_kv_cache < 1:
            raise ConfigError("--max_tokens_in_paged_kv_cache must be positive")


# ---- inputs ----------------------------------------------------------------------------------------------
def check_tokenizer_dir(path: str | Path) -> Path:
    """A directory whose Hugging Face tokenizer loads (the runtime's own check: files present, then a real load)."""
    from nasrt.runtime.text import load_tokenizer

    path = Path(path).resolve()
    tok = load_tokenizer(path)
    if tok.eos_token_id is None:
        log.warning("tokenizer in %s has no eos_token: clients must send end_id", path)
    return path


def _limit(build: dict[str, Any], key: str, where: Path, default: int | None = None,
           required: bool = True) -> int | None:
    """``build_config[key]`` as a positive int; ``default`` when absent, an error when required and absent."""
    value = build.get(key)
    if value is None:
        if default is None and required:
            raise ConfigError(f"{where}: build_config.{key} is missing")
        return default
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: build_config.{key} must be a positive integer, got {value!r}")
    return value


def read_engine(engine_dir: str | Path) -> EngineInfo:
    """An engine dir's limits, after the engine runner's own check (config sections, every ``rank{N}.engine``)."""
    from nasrt.deploy.engine.runner import validate_engine_dir

    engine_dir = Path(engine_dir).resolve()
    cfg = validate_engine_dir(engine_dir)
    build, cfg_path = cfg["build_config"], engine_dir / "config.json"
    mapping = Mapping.from_dict(cfg["pretrained_config"].get("mapping") or {})
    max_seq = _limit(build, "max_seq_len", cfg_path)
    max_input = _limit(build, "max_input_len", cfg_path, default=max_seq)
    return EngineInfo(engine_dir, mapping.tp_size, mapping.pp_size,
                      max_batch_size=_limit(build, "max_batch_size", cfg_path),
                      max_input_len=min(max_input, max_seq), max_seq_len=max_seq,
                      max_num_tokens=_limit(build, "max_num_tokens", cfg_path, required=False),
                      max_beam_width=_limit(build, "max_beam_width", cfg_path, default=1))


def read_reference_checkpoint(checkpoint_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """A TensorRT-LLM checkpoint dir for the reference runtime: config + every rank file present."""
    checkpoint_dir = Path(checkpoint_dir).resolve()
    cfg = read_json(checkpoint_dir / "config.json")
    if "pretrained_config" in cfg:
        raise ConfigError(f"{checkpoint_dir}: this is an engine dir; --reference needs the checkpoint dir the engine "
                          "was built from")
    if "layer_configs" not in cfg and "architecture" not in cfg:
        raise ConfigError(f"{checkpoint_dir}/config.json: not a TensorRT-LLM checkpoint config "
                          "(convert the HF model with `nasrt convert` first)")
    mapping = Mapping.from_dict(cfg.get("mapping") or {})
    missing = [f"rank{r}.safetensors" for r in range(mapping.world_size)
               if not (checkpoint_dir / f"rank{r}.safetensors").is_file()]
    if missing:
        raise CheckpointError(f"{checkpoint_dir}: missing rank file(s) {', '.join(missing)} "
                              f"(mapping world size {mapping.world_size})")
    return checkpoint_dir, cfg


# ---- model configs ----------------------------------------------------------------------------------------
def _bool(value: bool) -> str:
    return "true" if value else "false"


def _text_models(tokenizer_dir: Path, batch: int, opts: ServingOptions, max_input_len: int | None,
                 max_seq_len: int | None) -> dict[str, ModelConfig]:
    pre_params = {"tokenizer_dir": str(tokenizer_dir), "add_special_tokens": "true"}
    if max_input_len is not None:
        pre_params["max_input_len"] = str(max_input_len)
    if max_seq_len is not None:
        pre_params["max_seq_len"] = str(max_seq_len)
    return {
        "preprocessing": ModelConfig("preprocessing", batch, sig.PREPROCESSING_INPUTS, sig.PREPROCESSING_OUTPUTS,
                                     backend="python", dynamic_batching=True,
                                     instance_count=opts.preprocessing_instances, parameters=pre_params),
        "postprocessing": ModelConfig("postprocessing", batch, sig.POSTPROCESSING_INPUTS, sig.POSTPROCESSING_OUTPUTS,
                                      backend="python", dynamic_batching=True,
                                      instance_count=opts.postprocessing_instances,
                                      parameters={"tokenizer_dir": str(tokenizer_dir), "skip_special_tokens": "true"}),
        "ensemble": ModelConfig("ensemble", batch, sig.ENSEMBLE_INPUTS, sig.ENSEMBLE_OUTPUTS, platform="ensemble",
                                steps=sig.ENSEMBLE_STEPS),
    }


def _llm_model(batch: int, opts: ServingOptions, backend: str, parameters: dict[str, str]) -> ModelConfig:
    return ModelConfig("tensorrt_llm", batch, sig.LLM_INPUTS, sig.LLM_OUTPUTS, backend=backend,
                       decoupled=opts.decoupled, dynamic_batching=True, preferred_batch_size=batch,
                       max_queue_delay_us=opts.max_queue_delay_us, max_queue_size=0, instance_count=1,
                       parameters=parameters)


def engine_model_configs(engine: EngineInfo, tokenizer_dir: Path, opts: ServingOptions) -> dict[str, ModelConfig]:
    """The four configs for the C++ ``tensorrtllm`` backend serving ``engine``."""
    opts.check()
    batch = engine.max_batch_size if opts.max_batch_size is None else opts.max_batch_size
    if batch > engine.max_batch_size:
        raise ConfigError(f"--max_batch_size {batch} exceeds the engine's build-time max_batch_size "
                          f"{engine.max_batch_size} ({engine.engine_dir}/config.json)")
    params = {
        "gpt_model_type": "inflight_fused_batching",
        "gpt_model_path": str(engine.engine_dir),
        "max_beam_width": str(engine.max_beam_width),
        "batch_scheduler_policy": opts.batch_scheduler_policy,
        "kv_cache_free_gpu_mem_fraction": str(opts.kv_cache_free_gpu_mem_fraction),
        "enable_kv_cache_reuse": _bool(opts.enable_kv_cache_reuse),
        "exclude_input_in_output": _bool(opts.exclude_input_in_output),
        "enable_chunked_context": "false",
        "normalize_log_probs": "true",
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
        "executor_worker_path": EXECUTOR_WORKER,
        # read unconditionally by the C++ backend (no fallback: a missing one fails the model load); empty
        # guided-decoding values mean "no guided decoding" (nasrt.deploy.check.trtllm_schema.TRITON_REQUIRED)
        "tokenizer_dir": str(tokenizer_dir),
        "guided_decoding_backend": "",
        "xgrammar_tokenizer_info_path": "",
    }
    if opts.max_tokens_in_paged_kv_cache is not None:
        params["max_tokens_in_paged_kv_cache"] = str(opts.max_tokens_in_paged_kv_cache)
    models = _text_models(tokenizer_dir, batch, opts, engine.max_input_len, engine.max_seq_len)
    models["tensorrt_llm"] = _llm_model(batch, opts, "tensorrtllm", params)
    return models


def reference_model_configs(checkpoint_dir: Path, max_seq_len: int, tokenizer_dir: Path,
                            opts: ServingOptions, device: str = "cpu") -> dict[str, ModelConfig]:
    """The four configs of the CPU variant (``tensorrt_llm`` = nasrt reference runtime, same inputs/outputs)."""
    opts.check()
    batch = opts.max_batch_size or 4
    params = {"checkpoint_dir": str(checkpoint_dir), "device": device, "max_seq_len": str(max_seq_len),
              "exclude_input_in_output": _bool(opts.exclude_input_in_output)}
    models = _text_models(tokenizer_dir, batch, opts, None, max_seq_len)
    models["tensorrt_llm"] = _llm_model(batch, opts, "python", params)
    return models


# ---- writing ---------------------------------------------------------------------------------------------
REFERENCE_SHIM = '''"""Generated by nasrt {version}: Triton ``tensorrt_llm`` stand-in answered by nasrt's CPU reference runtime."""

from nasrt.deploy.triton.models.reference_llm import TritonPythonModel  # noqa: F401
'''


def model_sources(reference: bool) -> dict[str, str]:
    """``model.py`` text per Python model (pre/post-processing copied verbatim from :mod:`nasrt.deploy.triton.models`)."""
    sources = {name: (MODELS_DIR / f"{name}.py").read_text(encoding="utf-8")
               for name in ("preprocessing", "postprocessing")}
    if reference:
        sources["tensorrt_llm"] = REFERENCE_SHIM.format(version=nasrt.__version__)
    return sources


def _write(out: Path, models: dict[str, ModelConfig], sources: dict[str, str], record: dict[str, Any]) -> None:
    for name, config in models.items():
        text = config.render()
        if "${" in text:  # internal invariant: every value is filled from Python, never left as a placeholder
            raise NasrtError(f"{name}/config.pbtxt: unfilled placeholder in generated config")
        (out / name / "1").mkdir(parents=True)
        (out / name / "config.pbtxt").write_text(text, encoding="utf-8")
        if name in sources:
            (out / name / "1" / "model.py").write_text(sources[name], encoding="utf-8")
        if name in TOKENIZER_MODELS:  # the one tokenizer loader, beside the model that imports it
            (out / name / "1" / "nasrt_tokenizer.py").write_text(TOKENIZER_SOURCE.read_text(encoding="utf-8"),
                                                                  encoding="utf-8")
    write_json(out / RECORD, record)
    from nasrt.deploy.check import require_clean
    from nasrt.deploy.check.triton import check_repository

    require_clean(check_repository(out), "generated Triton repository (not written)", temporary=True)  # before the rename


def write_engine_repository(engine_dir: str | Path, tokenizer_dir: str | Path, output_dir: str | Path,
                            opts: ServingOptions = ServingOptions(), overwrite: bool = False) -> Path:
    """Write the repository serving a TensorRT-LLM engine with the C++ ``tensorrtllm`` backend."""
    engine = read_engine(engine_dir)
    tok = check_tokenizer_dir(tokenizer_dir)
    models = engine_model_configs(engine, tok, opts)
    output_dir = Path(output_dir).resolve()
    record = {"nasrt_version": nasrt.__version__, "variant": "engine", "engine_dir": str(engine.engine_dir),
              "tokenizer_dir": str(tok), "world_size": engine.world_size, "engine": _jsonable(asdict(engine)),
              "options": asdict(opts), "launch": format_command(launch_command(output_dir, engine.world_size)),
              "build": _build_record(engine.engine_dir)}
    with atomic_output_dir(output_dir, overwrite, inputs=(engine.engine_dir, tok)) as tmp:
        _write(tmp, models, model_sources(reference=False), record)
    log.info("wrote Triton model repository %s (engine %s, world size %d)", output_dir, engine.engine_dir,
             engine.world_size)
    return output_dir


def write_reference_repository(checkpoint_dir: str | Path, tokenizer_dir: str | Path, output_dir: str | Path,
                               opts: ServingOptions = ServingOptions(), max_seq_len: int | None = None,
                               device: str = "cpu", overwrite: bool = False) -> Path:
    """Write the CPU variant: ``tensorrt_llm`` answered by the reference runtime from ``checkpoint_dir``."""
    from nasrt.runtime.model import resolve_device

    ckpt, cfg = read_reference_checkpoint(checkpoint_dir)
    try:
        resolve_device(device)  # the serving machine is this one: fail now, not when Triton loads the model
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r}: {exc}") from None
    tok = check_tokenizer_dir(tokenizer_dir)
    limit = int(cfg.get("max_position_embeddings") or 2048)
    seq = limit if max_seq_len is None else max_seq_len
    if not 1 < seq <= limit:
        raise ConfigError(f"--max_seq_len {seq} must be in 2..{limit} (max_position_embeddings of {ckpt})")
    models = reference_model_configs(ckpt, seq, tok, opts, device)
    output_dir = Path(output_dir).resolve()
    record = {"nasrt_version": nasrt.__version__, "variant": "reference", "checkpoint_dir": str(ckpt),
              "tokenizer_dir": str(tok), "world_size": 1, "options": asdict(opts), "max_seq_len": seq, "device": device,
              "launch": format_command(launch_command(output_dir, 1))}
    with atomic_output_dir(output_dir, overwrite, inputs=(ckpt, tok)) as tmp:
        _write(tmp, models, model_sources(reference=True), record)
    log.info("wrote reference Triton model repository %s (checkpoint %s)", output_dir, ckpt)
    return output_dir


def _build_record(engine_dir: Path) -> dict[str, Any] | None:
    """The engine's ``nasrt build`` record (profile, nasrt version), when the engine was built by nasrt."""
    from nasrt.deploy.engine.build import RECORD_NAME

    path = engine_dir / RECORD_NAME
    return read_json(path) if path.is_file() else None


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
