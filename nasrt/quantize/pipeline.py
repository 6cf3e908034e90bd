"""``quantize.py`` end to end: validate, calibrate (layer-wise or whole-model), export atomically."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nasrt.arch import ModelSpec, from_hf_config, read_json
from nasrt.atomic import atomic_output_dir
from nasrt.convert import ConvertOptions, check_layout, resolve_dtype, validate_source
from nasrt.errors import CheckpointError, ConfigError, MissingDependencyError
from nasrt.quantize.calib_data import load_calibration_texts, load_tokenizer, tokenize_batches
from nasrt.quantize.calibrate import AmaxTable, QuantSettings
from nasrt.quantize.export import KV_SCALE_MODES, export_hf, export_trtllm, fp8_scales
from nasrt.st_io import SafetensorsReader
from nasrt.tensor_map import EMBEDDING

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("tensorrt_llm", "hf")


@dataclass(frozen=True)
class QuantizeOptions:
    dtype: str = "auto"
    qformat: str = "fp8"
    kv_cache_dtype: str | None = None
    calib_dataset: str | None = None
    calib_size: int = 512
    calib_max_seq_length: int = 512
    batch_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    quantize_lm_head: bool = False
    whole_model: bool = False
    export_format: str = "tensorrt_llm"
    kv_cache_scales: str = "clamped"
    tokenizer_dir: str | None = None
    device: str = "cpu"
    max_activation_memory_gb: float = 2.0


@dataclass
class QuantizeResult:
    output_dir: Path
    amax: AmaxTable
    calib_samples: int
    calib_seconds: float


_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def quantize_checkpoint(model_dir: str | Path, output_dir: str | Path, opts: QuantizeOptions = QuantizeOptions(),
                        overwrite: bool = False, progress: bool = True) -> QuantizeResult:
    """Calibrate the HF checkpoint in ``model_dir`` with ModelOpt and write an FP8 checkpoint to ``output_dir``."""
    model_dir = Path(model_dir)
    if opts.export_format not in EXPORT_FORMATS:
        raise ConfigError(f"--export_format {opts.export_format!r} is not one of {list(EXPORT_FORMATS)}")
    if opts.kv_cache_scales not in KV_SCALE_MODES:
        raise ConfigError(f"--kv_cache_scales {opts.kv_cache_scales!r} is not one of {list(KV_SCALE_MODES)}")
    if opts.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {opts.device!r} is not 'cpu' or 'cuda'")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise MissingDependencyError("--device cuda: no CUDA GPU is available to PyTorch here (use --device cpu)")
    settings = QuantSettings(opts.qformat, opts.kv_cache_dtype, opts.quantize_lm_head)
    cfg_path = model_dir / "config.json"
    hf_cfg = read_json(cfg_path)
    spec = from_hf_config(hf_cfg, str(cfg_path))
    dtype = resolve_dtype(opts.dtype, spec)
    convert_opts = ConvertOptions(dtype, opts.tp_size, opts.pp_size)
    if opts.export_format == "tensorrt_llm":
        check_layout(spec, convert_opts)
    if settings.kv and not spec.kv_heads_per_layer:
        log.warning("--kv_cache_dtype fp8: the model has no attention layers (no KV cache); no KV scales are "
                    "written and kv_cache_quant_algo stays null")
        settings = QuantSettings(opts.qformat, None, opts.quantize_lm_head)
    reader = SafetensorsReader(model_dir)
    validate_source(reader, spec)
    calib_dtype = reader.dtype(EMBEDDING.hf_names()[0])
    if calib_dtype not in _FLOAT:
        raise CheckpointError(f"{model_dir}: weights are {calib_dtype}; FP8 calibration needs a float16/bfloat16/"
                              "float32 checkpoint")
    batches = calibration_batches(opts.tokenizer_dir or model_dir, spec, opts)
    # Fail on the output name before the (long) calibration, not after.
    with atomic_output_dir(output_dir, overwrite, inputs=(model_dir,)) as tmp:
        log.info("calibrating %s (%d layers, %s) on %d samples, %s", model_dir, spec.num_layers, calib_dtype,
                 sum(len(b) for b in batches), "whole model" if opts.whole_model else "layer by layer")
        start = time.perf_counter()
        if opts.whole_model:
            from nasrt.quantize.whole import calibrate_whole

            amax, model = calibrate_whole(model_dir, reader, spec, batches, settings, calib_dtype, opts.device)
            del model
        else:
            from nasrt.quantize.layerwise import calibrate_layerwise

            amax = calibrate_layerwise(reader, spec, batches, settings, calib_dtype,
                                       max_memory_bytes=int(opts.max_activation_memory_gb * 2**30),
                                       spill_dir=tmp, progress=progress, device=opts.device)
        seconds = time.perf_counter() - start
        scales = fp8_scales(amax, spec, settings, opts.kv_cache_scales)
        if opts.export_format == "hf":
            export_hf(reader, spec, hf_cfg, dtype, scales, settings, tmp,
                      tokenizer_dir=Path(opts.tokenizer_dir or model_dir))
        else:
            export_trtllm(reader, spec, convert_opts, dtype, scales, settings, tmp, progress=progress)
    return QuantizeResult(Path(output_dir), amax, sum(len(b) for b in batches), seconds)


def calibration_batches(tokenizer_dir: str | Path, spec: ModelSpec, opts: QuantizeOptions) -> list[torch.Tensor]:
    """Token-id batches of the calibration set (``--calib_dataset``, ``--calib_size``, ...)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = load_calibration_texts(opts.calib_dataset, opts.calib_size)
    batches = tokenize_batches(tokenizer, texts, opts.calib_max_seq_length, opts.batch_size,
                               pad_token_id=_pad_id(tokenizer, spec))
    top = max(int(b.max()) for b in batches)
    if top >= spec.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_dir} produced token id {top}, outside the model's vocab_size "
                          f"{spec.vocab_size}: wrong --tokenizer_dir?")
    return batches


def _pad_id(tokenizer, spec) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, spec.eos_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, int):
            return candidate
    return 0
