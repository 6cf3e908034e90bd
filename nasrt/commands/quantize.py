"""``nasrt quantize`` / ``quantize.py``: HF DeciLM -> FP8 checkpoint calibrated with NVIDIA ModelOpt."""

from __future__ import annotations

import argparse

from nasrt.quantize.export import KV_SCALE_MODES
from nasrt.quantize.pipeline import EXPORT_FORMATS, QuantizeOptions
from nasrt.quantize.recipes import DEFAULT_RECIPE, RECIPES
from nasrt.quantize.report import RECORD_NAME, summary

HELP = "FP8-quantize an HF DeciLM / Llama checkpoint with ModelOpt (layer-wise calibration) for TensorRT-LLM"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_dir", required=True, help="HF model directory (config.json + *.safetensors + tokenizer)")
    p.add_argument("--output_dir", required=True, help="checkpoint directory to write")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16"],
                   help="dtype of the unquantized tensors (embedding, norms, lm_head)")
    p.add_argument("--qformat", default="fp8", help="quantization format (supported: fp8)")
    p.add_argument("--kv_cache_dtype", default=None, help="fp8: also quantize the KV cache")
    p.add_argument("--calib_dataset", default=None,
                   help="text / JSONL ('text' field) / parquet file or HF dataset name (needs a network); "
                        "default: CPython's bundled documentation (offline)")
    p.add_argument("--calib_size", type=int, default=512, help="number of calibration samples")
    p.add_argument("--calib_max_seq_length", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--batch_size", type=int, default=1, help="calibration batch size")
    p.add_argument("--tp_size", type=int, default=1)
    p.add_argument("--pp_size", type=int, default=1)
    p.add_argument("--quantize_lm_head", action="store_true", help="quantize lm_head to FP8 too")
    p.add_argument("--whole_model", action="store_true",
                   help="calibrate the whole model at once (ModelOpt's usual flow; needs the model in memory)")
    p.add_argument("--export_format", default="tensorrt_llm", choices=list(EXPORT_FORMATS))
    p.add_argument("--kv_cache_scales", default="clamped", choices=list(KV_SCALE_MODES),
                   help="clamped: KV scales >= 1.0 as ModelOpt's TensorRT-LLM export; calibrated: keep them")
    p.add_argument("--tokenizer_dir", default=None, help="tokenizer directory (default: --model_dir)")
    p.add_argument("--max_activation_memory_gb", type=float, default=2.0,
                   help="keep calibration activations on disk when they exceed this size")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir atomically")
    p.add_argument("--allow_external_files", action="store_true",
                   help="read weight files whose symlinks resolve outside --model_dir (refused by default)")
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=list(RECIPES),
                   help=("how FP8 scales are chosen: " + "; ".join(f"{r.name}: {r.description}"
                                                                   for r in RECIPES.values())
                         + f" (default {DEFAULT_RECIPE}: the best measured on SmolLM2)").replace("%", "%%"))
    p.add_argument("--bf16_budget", type=float, default=0.0,
                   help="keep the most FP8-sensitive linears, up to this fraction of all linear parameters, in "
                        "BF16 (exclude_modules of both exports); measures per-linear sensitivity")
    p.add_argument("--sensitivity", action="store_true",
                   help="measure the per-linear FP8 sensitivity table even with --bf16_budget 0")
    p.add_argument("--sensitivity_samples", type=int, default=4,
                   help="calibration samples the sensitivity is measured on")
    p.add_argument("--skip_eval", action="store_true",
                   help="skip the BF16 vs FP8 perplexity on held-out text (needs the model in memory)")
    p.add_argument("--eval_text", default=None,
                   help="held-out text file for the perplexity (default: the offline held-out slice); "
                        "refused if it overlaps the calibration data")
    p.add_argument("--eval_chars", type=int, default=12000, help="characters of held-out text to score")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="accepted for TensorRT-LLM compatibility; nasrt never runs remote code")


def run(args: argparse.Namespace) -> int:
    from nasrt.quantize import quantize_checkpoint

    opts = QuantizeOptions(dtype=args.dtype, qformat=args.qformat, kv_cache_dtype=args.kv_cache_dtype,
                           calib_dataset=args.calib_dataset, calib_size=args.calib_size,
                           calib_max_seq_length=args.calib_max_seq_length, batch_size=args.batch_size,
                           tp_size=args.tp_size, pp_size=args.pp_size, quantize_lm_head=args.quantize_lm_head,
                           whole_model=args.whole_model, export_format=args.export_format,
                           kv_cache_scales=args.kv_cache_scales, tokenizer_dir=args.tokenizer_dir,
                           device=args.device, max_activation_memory_gb=args.max_activation_memory_gb,
                           allow_external_files=args.allow_external_files, recipe=args.recipe,
                           bf16_budget=args.bf16_budget, sensitivity=args.sensitivity,
                           sensitivity_samples=args.sensitivity_samples, skip_eval=args.skip_eval,
                           eval_text=args.eval_text, eval_chars=args.eval_chars)
    res = quantize_checkpoint(args.model_dir, args.output_dir, opts, overwrite=args.overwrite)
    kind = "unified HF FP8" if args.export_format == "hf" else "TensorRT-LLM FP8"
    print(f"wrote {kind} checkpoint {res.output_dir} ({res.calib_samples} calibration samples, "
          f"calibration {res.calib_seconds:.1f} s)")
    if res.record is not None:
        print(summary(res.record))
        print(f"quality record: {res.output_dir / RECORD_NAME}")
    return 0
