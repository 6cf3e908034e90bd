#!/usr/bin/env python3
"""FP8 calibration benchmark: layer-wise against whole-model ModelOpt calibration, peak memory and wall time.

Writes (in a temporary folder, deleted at the end unless ``--keep``) a synthetic HF DeciLM checkpoint of
Nemotron-51B width (hidden 8192, 64 heads; a run of the 51B's own layer kinds: GQA kv 8, linear attention,
no-op attention, 7168-wide FFNs, one 14336-wide; small vocab) with a small tokenizer. Then, in one run and on the
same calibration batches, each in a fresh child process so its peak RSS (``VmHWM``) is its own:

* layer-wise: ``calibrate_layerwise`` (one block at a time from the safetensors);
* whole model: ``calibrate_whole`` (everything loaded, one ``mtq.quantize``; ModelOpt's usual flow);
* layer-wise with the new default recipe (GPTQ-rounded FP8 weights; issue 10), against the old default ``max``.

All timings cover loading the weights and calibration (not the Python imports); the modes run interleaved
``--repeat`` times and the best time / highest peak of each is used, since the CPUs may be shared. Prints the peak RSS of both,
their ratio, the wall-time ratio, and the largest amax difference between the two (they must agree). Targets
(issue 4): layer-wise <= 0.3x the memory at <= 1.2x the time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: Layers of the 51B's kinds (ATT/FFN: gK = GQA with n_heads_in_group K, L linear, N no_op; number = ffn_mult).
PATTERN = ("0:g8/1.3125 1:L/1.3125 2:N/1.3125 3:L/2.625 4:N/1.3125 5:L/1.3125 6:g8/1.3125 7:N/1.3125 "
           "8:L/1.3125 9:N/1.3125 10:L/1.3125 11:g8/1.3125")
GB = 1 << 30

CHILD = r"""
import json, pathlib, sys, time
t_import = time.perf_counter()
import torch
from safetensors.torch import save_file
from nasrt.arch import load_spec
from nasrt.quantize.calibrate import QuantSettings, register_attention
from nasrt.quantize.pipeline import QuantizeOptions, calibration_batches
from nasrt.st_io import SafetensorsReader
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
mode, model_dir, calib_size, seq, batch, out = sys.argv[1:7]
spec = load_spec(model_dir)
opts = QuantizeOptions(calib_size=int(calib_size), calib_max_seq_length=int(seq), batch_size=int(batch))
batches = calibration_batches(model_dir, spec, opts)
settings = QuantSettings(kv_cache_dtype="fp8")
reader = SafetensorsReader(model_dir)
register_attention()  # imports ModelOpt before the timer, like every other import
base = hwm()
t0 = time.perf_counter()
if mode.startswith("layerwise"):
    from nasrt.quantize.layerwise import calibrate_layerwise
    from nasrt.quantize.recipes import DEFAULT_RECIPE, get_recipe
    from nasrt.quantize.gptq import RoundedWeights
    recipe = get_recipe(DEFAULT_RECIPE if mode == "layerwise_new" else "max")
    rounded = RoundedWeights(pathlib.Path(out).parent) if recipe.gptq else None
    amax = calibrate_layerwise(reader, spec, batches, settings, torch.bfloat16, progress=False, recipe=recipe,
                               rounded=rounded)
    if rounded is not None:
        rounded.close()
else:
    from nasrt.quantize.whole import calibrate_whole
    amax, model = calibrate_whole(model_dir, reader, spec, batches, settings, torch.bfloat16)
dt = time.perf_counter() - t0
save_file({f"{m}|{k}": v.reshape(1) for m, d in amax.items() for k, v in d.items()}, out)
print(json.dumps({"seconds": dt, "rss_before": base, "peak_rss": hwm(), "tokens": sum(b.numel() for b in batches)}))
"""


def make_model(out: Path) -> Path:
    """The synthetic 51B-width checkpoint (one shard per ~layer) plus a tokenizer."""
    from nasrt.fixtures import write_synthetic
    from nasrt.quantize.tiny_tokenizer import write_tiny_tokenizer

    d = write_synthetic(out / "hf", "nemotron-51b-tiny", seed=0, shards=12, pattern=PATTERN, hidden_size=8192,
                        num_attention_heads=64, vocab_size=1024, overwrite=True)
    write_tiny_tokenizer(d, 1024)
    return d


def run_child(mode: str, model_dir: Path, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-c", CHILD, mode, str(model_dir), str(args.calib_size), str(args.seq),
           str(args.batch_size), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{mode} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib_size", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64, help="calibration tokens per sample")
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--workdir", default=None, help="where to write the model (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the model")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each mode (interleaved; best time is used)")
    args = ap.parse_args()

    from safetensors.torch import load_file

    from nasrt.arch import load_spec

    work = Path(args.workdir or tempfile.mkdtemp(prefix="nasrt-bench-quantize-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        model_dir = work / "hf" if (work / "hf" / "tokenizer.json").is_file() else make_model(work)
        spec = load_spec(model_dir)
        size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
        biggest = max(spec.layer_params(i) for i in range(spec.num_layers)) * 2
        print(f"model: {spec.num_layers} layers, hidden {spec.hidden_size}, {spec.num_attention_heads} heads, "
              f"{size / GB:.2f} GiB bf16 (largest block {biggest / GB:.2f} GiB); ready in "
              f"{time.perf_counter() - t0:.0f} s")
        res: dict[str, dict] = {}
        for rep in range(args.repeat):  # interleaved; best time and worst peak of each (shared, noisy CPUs)
            for mode in ("layerwise", "layerwise_new", "whole"):
                r = run_child(mode, model_dir, args, work / f"amax-{mode}.safetensors")
                print(f"{mode:>9} #{rep + 1}: {r['seconds']:7.1f} s   peak RSS {r['peak_rss'] / GB:6.2f} GiB "
                      f"(after imports {r['rss_before'] / GB:.2f} GiB)   {r['tokens']} calibration tokens")
                if mode in res:
                    r = {**r, "seconds": min(r["seconds"], res[mode]["seconds"]),
                         "peak_rss": max(r["peak_rss"], res[mode]["peak_rss"])}
                res[mode] = r
        a = load_file(str(work / "amax-layerwise.safetensors"))
        b = load_file(str(work / "amax-whole.safetensors"))
        if set(a) != set(b):
            sys.exit(f"layer-wise and whole-model calibrated different quantizers: {sorted(set(a) ^ set(b))[:5]}")
        rel = max(float((a[k] - b[k]).abs() / b[k].abs().clamp_min(1e-30)) for k in a)
        mem = res["layerwise"]["peak_rss"] / res["whole"]["peak_rss"]
        tim = res["layerwise"]["seconds"] / res["whole"]["seconds"]
        print(f"layer-wise / whole-model: peak RSS {mem:.2f}x (target <= 0.3x), wall time {tim:.2f}x "
              f"(target <= 1.2x); {len(a)} amax values, largest relative difference {rel:.1e}")
        mem_new = res["layerwise_new"]["peak_rss"] / res["whole"]["peak_rss"]
        tim_new = res["layerwise_new"]["seconds"] / res["layerwise"]["seconds"]
        print(f"new default recipe (layer-wise): peak RSS {mem_new:.2f}x whole-model (target <= 0.3x), wall time "
              f"{tim_new:.2f}x the old default (max) layer-wise calibration (target <= 1.2x)")
        ok = mem <= 0.3 and tim <= 1.2 and rel <= 1e-6 and mem_new <= 0.3 and tim_new <= 1.2
        print("PASS" if ok else "MISS")
        return 0 if ok else 1
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
