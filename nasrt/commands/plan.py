"""``nasrt plan``: weights and KV cache per GPU, token capacity, and a fit / no-fit verdict."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

from nasrt.arch import load_spec
from nasrt.atomic import check_output_file
from nasrt.deploy.plan import (
    BACKENDS,
    GPUS,
    KV_DTYPES,
    WEIGHT_DTYPES,
    PlanRequest,
    plan_memory,
    plot_plan,
    render,
    request_defaults,
    smallest_tp,
)
from nasrt.errors import NasrtError

HELP = "plan GPU memory: weights and KV cache per GPU, max tokens / batch, fit or not (exit 1 if it does not fit)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="HF model dir, TensorRT-LLM checkpoint dir, engine dir or a config.json (no weights needed)")
    p.add_argument("--profile", help="take gpu, tp/pp, dtypes, batch, seq and max_num_tokens from a build profile")
    p.add_argument("--gpu", choices=list(GPUS), help="GPU kind (default h100-80gb)")
    p.add_argument("--tp", type=int, help="tensor parallel size (default: checkpoint's, else 1)")
    p.add_argument("--pp", type=int, help="pipeline parallel size (default: checkpoint's, else 1)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES,
                   help="weights: a 16/32-bit dtype, or fp8 (FP8 linears, 16-bit embedding/lm_head/norms)")
    p.add_argument("--kv_cache_dtype", choices=KV_DTYPES, help="KV cache dtype (auto: fp8 with --dtype fp8)")
    p.add_argument("--batch", type=int, help="concurrent sequences (default 1)")
    p.add_argument("--seq", type=int, help="tokens per sequence, prompt + output (default 4096)")
    p.add_argument("--max_num_tokens", type=int, help="engine max_num_tokens, sizes activations (default 8192)")
    p.add_argument("--kv_fraction", type=float, help="kv_cache_free_gpu_memory_fraction (default 0.9)")
    p.add_argument("--backend", choices=BACKENDS, default="engine",
                   help="engine: trtllm-build engine (TensorRT-LLM <= 1.2); pytorch: the PyTorch backend (trtllm-serve / "
                        "LLM API on the HF or ModelOpt FP8 checkpoint; adds its CUDA-graph pool)")
    p.add_argument("--plot", help="write a PNG of per-layer parameters and KV heads to this file (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _plan_flags(exc: NasrtError) -> NasrtError:
    """The same error with the layout flags named as ``plan`` spells them (the shared sharding code names the
    converter's ``--tp_size`` / ``--pp_size``)."""
    return type(exc)(re.sub(r"--(tp|pp)_size\b", r"--\1", str(exc)))


def _profile_files(profile: str | None) -> list[Path]:
    """The file(s) ``--profile`` may name (a path, or ``build/<name>.json``): inputs a --plot must not touch."""
    if not profile:
        return []
    from nasrt.deploy.profiles import PROFILE_DIR

    return [p for p in (Path(profile), PROFILE_DIR / f"{profile}.json") if p.exists()]


def run(args: argparse.Namespace) -> int:
    inputs = (args.model, *_profile_files(args.profile))
    if args.plot:  # refuse a bad --plot before any work
        check_output_file(args.plot, args.overwrite, inputs, "--plot")
    spec = load_spec(args.model)
    values = request_defaults(args.model)
    if args.profile:
        from nasrt.deploy.profiles import load_profile

        prof = load_profile(args.profile)
        values.update(gpu=prof.gpu, tp=prof.tp_size, pp=prof.pp_size, batch=prof.max_batch_size,
                      seq=prof.max_seq_len, max_num_tokens=prof.max_num_tokens,
                      kv_fraction=prof.kv_cache_free_gpu_memory_fraction, tokens_per_block=prof.tokens_per_block)
        if prof.quant_algo == "FP8":
            values["dtype"] = "fp8"
        values["kv_cache_dtype"] = "fp8" if prof.kv_cache_quant_algo == "FP8" else "auto"
    values["backend"] = args.backend
    for key in ("gpu", "tp", "pp", "dtype", "kv_cache_dtype", "batch", "seq", "max_num_tokens", "kv_fraction"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    fields = {f.name for f in dataclasses.fields(PlanRequest)}
    req = PlanRequest(**{k: v for k, v in values.items() if k in fields})
    try:
        plan = plan_memory(spec, req)
    except NasrtError as exc:
        raise _plan_flags(exc) from None
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(render(plan))
        if not plan.fits:
            tp = smallest_tp(spec, req)
            print(f"smallest tp that fits ({req.gpu}, pp {req.pp}): {tp if tp else 'none up to 8'}")
    if args.plot:
        print(f"wrote {plot_plan(plan, args.plot, title=str(args.model), overwrite=args.overwrite, inputs=inputs)}")
    return 0 if plan.fits else 1
