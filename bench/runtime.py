#!/usr/bin/env python3
"""Reference runtime speed on CPU: nasrt vs transformers on the same SmolLM2 weights, dtype and thread count.

Prints prefill and decode tokens/s at batch 1 and 8, peak RSS, the memory-copy bandwidth measured in this run
and the physical decode limit (weight bytes read per decode step / bandwidth). Targets: nasrt >= 1.0x
transformers at batch 1 and 8; batch-1 decode >= 70% of the bandwidth limit.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nasrt.convert import ConvertOptions, convert_checkpoint  # noqa: E402
from nasrt.fixtures import DEFAULT_CACHE, smollm2_dir  # noqa: E402
from nasrt.runtime import load_model  # noqa: E402


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by a large tensor copy; best of ``repeats``."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def nasrt_runs(model, batch: int, prompt: int, steps: int):
    """(prefill seconds, decode seconds) callables for nasrt."""
    ids = torch.randint(0, model.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))

    def prefill() -> float:
        cache = model.new_cache(batch, prompt + steps)
        return _timed(lambda: model.prefill(ids, None, cache))

    def decode() -> float:
        cache = model.new_cache(batch, prompt + steps)
        tok = model.prefill(ids, None, cache).argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            tok = model.decode_one_token(tok, cache).argmax(-1)
        return time.perf_counter() - t

    return prefill, decode


def hf_runs(model, batch: int, prompt: int, steps: int):
    """(prefill seconds, decode seconds) callables for transformers (its default DynamicCache, greedy argmax)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))

    @torch.inference_mode()
    def prefill() -> float:
        return _timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1))

    @torch.inference_mode()
    def decode() -> float:
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        t = time.perf_counter()
        tok = out.logits[:, -1].argmax(-1)
        for _ in range(steps):
            out = model(input_ids=tok[:, None], cache=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1].argmax(-1)
        return time.perf_counter() - t

    return prefill, decode


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--steps", type=int, default=32, help="decode steps timed")
    p.add_argument("--repeats", type=int, default=3, help="best of N timings (the machine may be shared)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    hf_dir = smollm2_dir()
    ckpt = DEFAULT_CACHE / "bench" / f"smollm2-{args.dtype}"
    if not (ckpt / "config.json").is_file():
        convert_checkpoint(hf_dir, ckpt, ConvertOptions(dtype=args.dtype), overwrite=True)
    bw = copy_bandwidth()
    print(f"SmolLM2-135M-Instruct, dtype {args.dtype}, {args.threads} threads, prompt {args.prompt_len}, "
          f"{args.steps} decode steps, best of {args.repeats}")
    print(f"memory-copy bandwidth: {bw / 1e9:.2f} GB/s (read + write)")

    base = rss_mb()
    model = load_model(ckpt, dtype=args.dtype)
    nasrt_fns = {b: nasrt_runs(model, b, args.prompt_len, args.steps) for b in args.batches}
    for pre, dec in nasrt_fns.values():  # warm-up (touches every weight page)
        pre(), dec()
    nasrt_rss = rss_mb() - base
    peak_nasrt = peak_rss_mb()

    from transformers import LlamaForCausalLM

    base = rss_mb()
    hf = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=getattr(torch, args.dtype)).eval()
    hf_fns = {b: hf_runs(hf, b, args.prompt_len, args.steps) for b in args.batches}
    for pre, dec in hf_fns.values():
        pre(), dec()
    hf_rss = rss_mb() - base
    peak_all = peak_rss_mb()
    weight_bytes = model.decode_weight_bytes
    limit = bw / weight_bytes  # decode steps per second if every weight byte is read once per step

    # interleaved, best of N: both runtimes see the same machine load (the machine may be shared)
    best: dict[tuple[str, int, str], float] = {}
    for _ in range(args.repeats):
        for b in args.batches:
            for name, fns in (("nasrt", nasrt_fns), ("hf", hf_fns)):
                for phase, fn in zip(("prefill", "decode"), fns[b], strict=True):
                    key = (name, b, phase)
                    best[key] = min(best.get(key, float("inf")), fn())
    bw = max(bw, copy_bandwidth())  # best of the two measurements
    limit = bw / weight_bytes
    tps = {(n, b, ph): b * (args.prompt_len if ph == "prefill" else args.steps) / t
           for (n, b, ph), t in best.items()}
    res_n = {b: (tps["nasrt", b, "prefill"], tps["nasrt", b, "decode"]) for b in args.batches}
    res_h = {b: (tps["hf", b, "prefill"], tps["hf", b, "decode"]) for b in args.batches}

    print(f"memory-copy bandwidth (best of start/end): {bw / 1e9:.2f} GB/s; load average during the run "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"weight bytes read per decode step: {weight_bytes / 1e6:.1f} MB -> bandwidth limit "
          f"{limit:.1f} steps/s (batch-1 tokens/s)")
    print(f"{'batch':>5} | {'prefill tok/s nasrt':>19} {'transformers':>12} {'ratio':>6} | "
          f"{'decode tok/s nasrt':>18} {'transformers':>12} {'ratio':>6}")
    for b in args.batches:
        (pn, dn), (ph, dh) = res_n[b], res_h[b]
        print(f"{b:>5} | {pn:>19.1f} {ph:>12.1f} {pn / ph:>5.2f}x | {dn:>18.1f} {dh:>12.1f} {dn / dh:>5.2f}x")
    if 1 in res_n:
        frac = res_n[1][1] / limit
        print(f"batch-1 decode: {res_n[1][1]:.1f} tok/s = {100 * frac:.0f}% of the bandwidth limit "
              f"({limit:.1f} tok/s); target >= 70%")
    print(f"RSS growth after load + warm-up: nasrt {nasrt_rss:.0f} MB, transformers {hf_rss:.0f} MB; "
          f"process peak RSS: {peak_nasrt:.0f} MB with nasrt alone, {peak_all:.0f} MB with both")
    return 0


if __name__ == "__main__":
    sys.exit(main())
