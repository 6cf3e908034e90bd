"""``quantize.py`` end to end: validate, calibrate (layer-wise or whole-model), export atomically."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nasrt.arch import ModelSpec, from_hf_config, read_json
from nasrt.atomic import atomic_output_dir, write_json
from nasrt.convert import ConvertOptions, check_layout, check_output, resolve_dtype, validate_source
from nasrt.errors import CheckpointError, ConfigError, MissingDependencyError
from nasrt.quantize.calib_data import (
    DEFAULT_DATASET,
    load_calibration_texts,
    load_tokenizer,
    tokenize_batches,
)
from nasrt.quantize.calibrate import AmaxTable, QuantSettings
from nasrt.quantize.export import KV_SCALE_MODES, export_hf, export_trtllm, fp8_scales
from nasrt.quantize.gptq import RoundedWeights
from nasrt.quantize.recipes import DEFAULT_RECIPE, all_units, get_recipe
from nasrt.quantize.report import RECORD_NAME, build_record, check_disjoint, evaluate
from nasrt.quantize.sensitivity import choose_bf16_units, measure_sensitivity
from nasrt.st_io import SafetensorsReader
from nasrt.tensor_map import EMBEDDING
from nasrt.textdata import eval_text

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
    allow_external_files: bool = False
    recipe: str = DEFAULT_RECIPE
    bf16_budget: float = 0.0
    sensitivity: bool = False  # measure per-linear sensitivity even with bf16_budget 0
    sensitivity_samples: int = 4
    skip_eval: bool = False
    eval_text: str | None = None  # a text file; default: the offline held-out slice (nasrt.textdata.eval_text)
    eval_chars: int = 12000
    eval_seq_len: int = 512


@dataclass
class QuantizeResult:
    output_dir: Path
    amax: AmaxTable
    calib_samples: int
    calib_seconds: float
    record: dict | None = None
    sensitivity_seconds: float = 0.0


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
    recipe = get_recipe(opts.recipe)
    if not 0.0 <= opts.bf16_budget < 1.0:
        raise ConfigError(f"--bf16_budget {opts.bf16_budget} must be in [0, 1)")
    if opts.bf16_budget and opts.pp_size > 1:
        raise ConfigError("--bf16_budget with --pp_size > 1 is not supported (exclude_modules name local layers)")
    if opts.sensitivity_samples < 1:
        raise ConfigError(f"--sensitivity_samples {opts.sensitivity_samples} must be >= 1")
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
    if opts.whole_model:
        from nasrt.quantize.whole import refuse_pickle_only

        refuse_pickle_only(model_dir)
    reader = SafetensorsReader(model_dir, allow_external=opts.allow_external_files)
    validate_source(reader, spec)
    calib_dtype = reader.dtype(EMBEDDING.hf_names()[0])
    if calib_dtype not in _FLOAT:
        raise CheckpointError(f"{model_dir}: weights are {calib_dtype}; FP8 calibration needs a float16/bfloat16/"
                              "float32 checkpoint")
    batches, sens_batches = calibration_sets(opts.tokenizer_dir or model_dir, spec, opts)
    eval_source, eval_body = _eval_text(opts)
    if not opts.skip_eval:  # refuse an overlapping evaluation text before the (long) calibration
        from nasrt.runtime.text import load_tokenizer as runtime_tokenizer

        ids = runtime_tokenizer(opts.tokenizer_dir or model_dir)(eval_body, add_special_tokens=False)["input_ids"]
        check_disjoint(batches, ids, what=f"evaluation text ({eval_source})")
    # Fail on the output name before the (long) calibration, not after.
    # GPTQ's FP8 codes live in a scratch dir inside the temporary output, removed before it is renamed.
    with atomic_output_dir(output_dir, overwrite, inputs=(model_dir,)) as tmp, \
            (RoundedWeights(tmp) if recipe.gptq else contextlib.nullcontext()) as rounded:
        log.info("calibrating %s (%d layers, %s) on %d samples, %s", model_dir, spec.num_layers, calib_dtype,
                 sum(len(b) for b in batches), "whole model" if opts.whole_model else "layer by layer")
        start = time.perf_counter()
        record: dict = {}
        if opts.whole_model:
            from nasrt.quantize.whole import calibrate_whole

            amax, model = calibrate_whole(model_dir, reader, spec, batches, settings, calib_dtype, opts.device,
                                          recipe=recipe, record=record, rounded=rounded)
            del model
        else:
            from nasrt.quantize.layerwise import calibrate_layerwise

            amax = calibrate_layerwise(reader, spec, batches, settings, calib_dtype,
                                       max_memory_bytes=int(opts.max_activation_memory_gb * 2**30),
                                       spill_dir=tmp, progress=progress, device=opts.device, recipe=recipe,
                                       record=record, rounded=rounded)
        seconds = time.perf_counter() - start
        units = all_units(spec)
        sizes = {u.name: sum(reader.shape(m + ".weight")[0] * reader.shape(m + ".weight")[1]
                             for m in u.hf_modules) for u in units}
        sensitivity, bf16_units, sens_seconds = None, [], 0.0
        if opts.bf16_budget > 0 or opts.sensitivity:
            t0 = time.perf_counter()
            sensitivity = measure_sensitivity(reader, spec, sens_batches, amax, calib_dtype, opts.device, progress,
                                              rounded)
            sens_seconds = time.perf_counter() - t0
            bf16_units = choose_bf16_units(sensitivity, sizes, opts.bf16_budget)
            chosen = [u for u in units if u.name in bf16_units]
            settings = replace(settings, exclude=tuple(m for u in chosen for m in u.trt_modules()),
                               hf_exclude=tuple(chosen_hf for u in chosen for chosen_hf in u.hf_modules))
        scales = fp8_scales(amax, spec, settings, opts.kv_cache_scales)
        tokenizer_dir = Path(opts.tokenizer_dir or model_dir)
        if opts.export_format == "hf":
            export_hf(reader, spec, hf_cfg, dtype, scales, settings, tmp, tokenizer_dir=tokenizer_dir,
                      rounded=rounded)
        else:
            export_trtllm(reader, spec, convert_opts, dtype, scales, settings, tmp, progress=progress,
                          rounded=rounded)
            check_output(tmp, output_dir)
        evaluation = None
        if not opts.skip_eval:
            evaluation = _evaluate(model_dir, reader, spec, opts, convert_opts, dtype, scales, settings, tmp,
                                   tokenizer_dir, eval_source, eval_body, batches, progress, rounded)
        record = build_record(recipe=recipe, settings=settings, opts=opts, calib_source=_calib_source(opts),
                              calib_samples=sum(len(b) for b in batches),
                              calib_tokens=sum(b.numel() for b in batches), units=units, sizes=sizes,
                              choices=record, sensitivity=sensitivity,
                              sensitivity_samples=len(sens_batches), bf16_units=bf16_units, evaluation=evaluation)
        write_json(tmp / RECORD_NAME, record)
    return QuantizeResult(Path(output_dir), amax, sum(len(b) for b in batches), seconds, record, sens_seconds)


def _calib_source(opts: QuantizeOptions) -> str:
    if opts.calib_dataset in (None, "", DEFAULT_DATASET):
        return "pydoc_data.topics (calibration slice)"
    return Path(opts.calib_dataset).name if Path(opts.calib_dataset).is_file() else opts.calib_dataset


def _eval_text(opts: QuantizeOptions) -> tuple[str, str]:
    """(description, text) of the held-out evaluation text; read before calibration so a bad path fails early."""
    if opts.skip_eval:
        return "", ""
    if opts.eval_text:
        path = Path(opts.eval_text)
        if not path.is_file():
            raise ConfigError(f"--eval_text {path}: file not found")
        text = path.read_text(encoding="utf-8", errors="replace")
        return f"{path.name} (first {opts.eval_chars} characters)", text[:opts.eval_chars]
    return (f"pydoc_data.topics held-out slice (first {opts.eval_chars} characters)",
            eval_text(opts.eval_chars))


def _evaluate(model_dir, reader, spec, opts, convert_opts, dtype, scales, settings, tmp: Path, tokenizer_dir,
              source: str, text: str, batches, progress: bool, rounded: RoundedWeights | None) -> dict:
    """Held-out perplexity of BF16 and of the FP8 checkpoint just written (for ``--export_format hf`` its
    TensorRT-LLM twin, written with the same scales into a scratch directory)."""
    import shutil
    import tempfile

    scratch = None
    fp8_dir = tmp
    try:
        if opts.export_format == "hf":
            scratch = Path(tempfile.mkdtemp(prefix=".nasrt-eval-fp8-", dir=tmp.parent))
            export_trtllm(reader, spec, ConvertOptions(dtype), dtype, scales, settings, scratch, progress=False,
                          rounded=rounded)
            fp8_dir = scratch
        return evaluate(model_dir, fp8_dir, tokenizer_dir, text, batches, source,
                        min(opts.eval_seq_len, spec.max_position_embeddings), opts.device, tmp.parent, progress)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def calibration_batches(tokenizer_dir: str | Path, spec: ModelSpec, opts: QuantizeOptions) -> list[torch.Tensor]:
    """Token-id batches of the calibration set (``--calib_dataset``, ``--calib_size``, ...)."""
    return calibration_sets(tokenizer_dir, spec, opts)[0]


def calibration_sets(tokenizer_dir: str | Path, spec: ModelSpec,
                     opts: QuantizeOptions) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The calibration batches and the sensitivity sample (the first ``--sensitivity_samples`` texts, one
    unpadded sequence each)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = load_calibration_texts(opts.calib_dataset, opts.calib_size)
    pad = _pad_id(tokenizer, spec)
    batches = tokenize_batches(tokenizer, texts, opts.calib_max_seq_length, opts.batch_size, pad_token_id=pad)
    top = max(int(b.max()) for b in batches)
    if top >= spec.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer_dir} produced token id {top}, outside the model's vocab_size "
                          f"{spec.vocab_size}: wrong --tokenizer_dir?")
    sample = tokenize_batches(tokenizer, texts[:opts.sensitivity_samples], opts.calib_max_seq_length, 1,
                              pad_token_id=pad)
    return batches, sample


def _pad_id(tokenizer, spec) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, spec.eos_token_id):
        if isinstance(candidate, list):
            candidate = candidate[0] if candidate else None
        if isinstance(candidate, int):
            return candidate
    return 0
