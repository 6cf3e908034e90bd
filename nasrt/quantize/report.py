"""``nasrt_quantization.json``: what an FP8 checkpoint was made with and what it cost, plus the held-out
perplexity evaluation (BF16 vs FP8 on the reference runtime) and the check that the evaluation text is disjoint
from the calibration text.

The record holds no timings or paths of temporary files, so the same inputs and flags give the same bytes.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

import nasrt
from nasrt.errors import ConfigError
from nasrt.quantize import gptq

log = logging.getLogger(__name__)

RECORD_NAME = "nasrt_quantization.json"
#: Token n-gram length of the disjointness check: an evaluation window of this many tokens that also occurs in
#: the calibration set means the two texts overlap.
DISJOINT_NGRAM = 24
SENSITIVITY_MEASURE = ("kl_gain: how much the mean per-token KL(BF16 || FP8) of the fully-FP8 model's final "
                       "next-token distribution drops when only this scale group (weights + input activations) is "
                       "kept BF16 (negative: keeping it BF16 makes the model worse), measured layer by layer on the "
                       "first calibration samples")


#: What the TensorRT-LLM ``kv_cache_scaling_factor`` is, per ``--kv_cache_scales`` (the unified export always keeps
#: the calibrated ``k_scale`` / ``v_scale``). ModelOpt's ``fp8_cast`` KV format (its default from 0.43) is no
#: calibration at all: scale 1.0, so the cache clamps |k|, |v| at 448; ``clamped`` equals ``fp8_cast`` whenever the
#: calibrated amax is below 448 and only grows the scale (no clamping of real values) when it is above.
KV_RULES = {
    "clamped": "max(k_amax, v_amax) / 448, raised to at least 1.0 (ModelOpt's TensorRT-LLM export rule; equals "
               "fp8_cast's 1.0 unless the calibrated amax exceeds 448)",
    "calibrated": "max(k_amax, v_amax) / 448 as calibrated (values beyond the calibrated amax are clamped)",
}


def _ngrams(ids: list[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(ids[k:k + n]) for k in range(max(len(ids) - n + 1, 0))}


def check_disjoint(calib: list[torch.Tensor], eval_ids: list[int], n: int = DISJOINT_NGRAM,
                   what: str = "evaluation text") -> dict[str, Any]:
    """Refuse (``ConfigError``) an evaluation text sharing any ``n``-token window with the calibration batches."""
    seen: set[tuple[int, ...]] = set()
    for b in calib:
        for row in b.tolist():
            seen |= _ngrams(row, n)
    hits = sum(g in seen for g in _ngrams(eval_ids, n))
    if hits:
        raise ConfigError(f"{what} shares {hits} {n}-token windows with the calibration data (--calib_dataset): "
                          "the held-out perplexity would not be held out; pick another --eval_text or --skip_eval")
    return {"ngram_tokens": n, "shared_windows": 0, "eval_windows": max(len(eval_ids) - n + 1, 0)}


def evaluate(model_dir: Path, fp8_trtllm_dir: Path, tokenizer_dir: Path, text: str, calib: list[torch.Tensor],
             text_source: str, max_seq_len: int, device: str, scratch_parent: Path,
             progress: bool = True) -> dict[str, Any]:
    """BF16 (converted into a scratch directory, removed afterwards) and FP8 perplexity of ``text``."""
    from nasrt.convert import ConvertOptions, convert_checkpoint
    from nasrt.eval import perplexity
    from nasrt.runtime import load_model
    from nasrt.runtime.text import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    disjoint = check_disjoint(calib, ids, what=f"evaluation text ({text_source})")
    scratch = Path(tempfile.mkdtemp(prefix=".nasrt-eval-", dir=scratch_parent))
    try:
        bf16_dir = convert_checkpoint(model_dir, scratch / "bf16", ConvertOptions("bfloat16"), progress=False)
        ppl = {}
        for name, d in (("bf16", bf16_dir), ("fp8", fp8_trtllm_dir)):
            model = load_model(d, device=device, dtype="float32")
            ppl[name] = perplexity(model, tok, text, max_seq_len=max_seq_len, progress=progress)
            del model
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"text": text_source, "tokens": len(ids), "max_seq_len": max_seq_len, "compute_dtype": "float32",
            "runtime": "nasrt reference runtime", "disjoint_from_calibration": disjoint,
            "perplexity_bf16": round(ppl["bf16"], 4), "perplexity_fp8": round(ppl["fp8"], 4),
            "delta_percent": round((ppl["fp8"] / ppl["bf16"] - 1) * 100, 3)}


def build_record(*, recipe, settings, opts, calib_source: str, calib_samples: int, calib_tokens: int,
                 units: list, sizes: dict[str, int], choices: dict[str, dict], sensitivity: dict[str, float] | None,
                 sensitivity_samples: int, bf16_units: list[str], evaluation: dict[str, Any] | None) -> dict:
    """The JSON record (deterministic: no timings)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        modelopt_version = version("nvidia-modelopt")
    except PackageNotFoundError:
        modelopt_version = None
    table = []
    for u in units:
        row = {"module": u.name, "trt_modules": u.trt_modules(), "hf_modules": list(u.hf_modules),
               "params": sizes[u.name], "bf16": u.name in bf16_units, **choices.get(u.name, {})}
        if sensitivity is not None:
            row["kl_gain"] = float(f"{sensitivity.get(u.name, 0.0):.6g}")
        table.append(row)
    if sensitivity is not None:
        table.sort(key=lambda r: (-r["kl_gain"], r["module"]))
    total = sum(sizes.values())
    return {
        "producer": {"name": "nasrt", "version": nasrt.__version__, "modelopt": modelopt_version},
        "recipe": {"name": recipe.name, "description": recipe.description, "qformat": settings.qformat,
                   "kv_cache_dtype": settings.kv_cache_dtype, "kv_cache_scales": opts.kv_cache_scales,
                   "kv_cache_scale_rule": KV_RULES[opts.kv_cache_scales] if settings.kv else None,
                   "algorithms": {"weights": recipe.weight, "weight_rounding": _rounding(recipe),
                                  "activations": recipe.activation,
                                  **({"activation_percentile": recipe.percentile}
                                     if recipe.activation == "percentile" else {}),
                                  "kv_cache": "max (ModelOpt k/v_bmm_quantizer)" if settings.kv else None,
                                  "scale_sharing": "q/k/v one weight scale; fc/gate one weight scale"},
                   "quantize_lm_head": settings.quantize_lm_head},
        "calibration": {"data_source": calib_source, "samples": calib_samples, "tokens": calib_tokens,
                        "max_seq_length": opts.calib_max_seq_length, "batch_size": opts.batch_size,
                        "mode": "whole model" if opts.whole_model else "layer by layer"},
        "bf16_budget": opts.bf16_budget,
        "bf16_modules": {"trt": list(settings.exclude), "hf": list(settings.hf_exclude),
                         "params": sum(sizes[n] for n in bf16_units),
                         "fraction": round(sum(sizes[n] for n in bf16_units) / total, 6) if total else 0.0},
        "sensitivity": None if sensitivity is None else {"measure": SENSITIVITY_MEASURE,
                                                         "samples": sensitivity_samples},
        "linears": table,
        "evaluation": evaluation,
    }


def _rounding(recipe) -> str:
    if not recipe.gptq:
        return "nearest"
    return f"gptq (columns in decreasing E[x_j^2], damping {gptq.DAMP} x mean diag, block {gptq.BLOCK})"


def summary(record: dict) -> str:
    """Lines printed at the end of ``nasrt quantize``."""
    r, c = record["recipe"], record["calibration"]
    lines = [f"recipe {r['name']} (weights {r['algorithms']['weights']}, rounding "
             f"{r['algorithms']['weight_rounding'].split(' ')[0]}, activations "
             f"{r['algorithms']['activations']}, KV {r['kv_cache_dtype'] or 'not quantized'}), calibration "
             f"{c['samples']} samples / {c['tokens']} tokens of {c['data_source']}"]
    b = record["bf16_modules"]
    if record["bf16_budget"]:
        lines.append(f"BF16 budget {record['bf16_budget']}: {len(b['trt'])} linears kept BF16 "
                     f"({b['fraction'] * 100:.2f} % of linear parameters)")
    if record["sensitivity"] is not None:
        top = ", ".join(f"{row['module']} {row['kl_gain']:.3g}" for row in record["linears"][:5])
        lines.append(f"most FP8-sensitive (KL gain if kept BF16): {top}")
    e = record["evaluation"]
    if e is not None:
        lines.append(f"held-out perplexity ({e['text']}, {e['tokens']} tokens): BF16 {e['perplexity_bf16']:.4f}, "
                     f"FP8 {e['perplexity_fp8']:.4f} ({e['delta_percent']:+.2f} %)")
    return "\n".join(lines)
