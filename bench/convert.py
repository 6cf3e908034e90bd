#!/usr/bin/env python3
"""Converter benchmark: throughput against a plain file copy, and peak memory against the largest tensor.

Writes (in a temporary folder, deleted at the end) a synthetic HF DeciLM checkpoint with Nemotron-51B-width tensors
(hidden 8192, 64 heads; layers of the real 51B kinds incl. a 28672-wide FFN; vocab reduced), one shard per layer
plus an index. Then, in one run:

* copy baseline: ``shutil.copyfile`` of every source file (page cache primed by reading the sources first);
* conversion at tp = 1 and tp = 2 (bf16 -> bf16), each in a fresh child process so its peak RSS (``VmHWM``) is its
  own; the source is primed the same way and dirty pages are flushed (``os.sync``) before every timed step. Both
  timings end with an ``fsync`` of every file written, so they compare bytes that reached the disk.

Prints throughput as a ratio to the copy and peak RSS as a ratio to the largest tensor. Targets (issue 2):
>= 0.7x copy at tp = 1; peak RSS <= 3x largest tensor + 500 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nasrt.arch import from_hf_config, load_spec  # noqa: E402
from nasrt.presets import hf_config  # noqa: E402
from nasrt.tensor_map import expected_hf_tensors  # noqa: E402

#: 51B layer kinds: GQA kv 8 + the 70B-wide FFN, linear attention + 14336 FFN, no_op attention + 7168 FFN.
PATTERN = "0:g8/5.25 1:L/2.625 2:N/1.3125"
MB = 1 << 20

# VmHWM (peak RSS of this process image; unlike ru_maxrss it is not inherited from the forking parent).
CHILD = r"""
import json, os, sys, time
from nasrt.convert import ConvertOptions, convert_checkpoint
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
src, dst, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
base = hwm()
t0 = time.perf_counter()
convert_checkpoint(src, dst, ConvertOptions("bfloat16", tp, 1), progress=False)
for name in sorted(os.listdir(dst)):
    fd = os.open(os.path.join(dst, name), os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
dt = time.perf_counter() - t0
print(json.dumps({"seconds": dt, "rss_before": base, "peak_rss": hwm()}))
"""


def write_source(out: Path, vocab: int) -> tuple[int, int]:
    """Write the checkpoint one layer per shard (never the whole model in memory); returns (bytes, largest)."""
    cfg = hf_config(PATTERN, hidden_size=8192, num_attention_heads=64, vocab_size=vocab)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shapes = expected_hf_tensors(from_hf_config(cfg))
    groups: dict[str, list[str]] = {}
    for name in shapes:
        key = name.split(".")[2] if name.startswith("model.layers.") else "globals"
        groups.setdefault(key, []).append(name)
    weight_map, total, largest = {}, 0, 0
    gen = torch.Generator().manual_seed(0)
    for n, (key, names) in enumerate(groups.items()):
        fname = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: torch.empty(shapes[name], dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
                   for name in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            total += nbytes
            largest = max(largest, nbytes)
            weight_map[name] = fname
        print(f"  wrote {fname} ({key}: {sum(t.numel() * 2 for t in tensors.values()) / MB:.0f} MiB)", flush=True)
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total, largest


def prime(src: Path) -> None:
    """Read every source file once (same page-cache state for every measurement), then flush dirty pages."""
    for p in sorted(src.iterdir()):
        with open(p, "rb") as fh:
            while fh.read(64 * MB):
                pass
    os.sync()


def fsync_dir(d: Path) -> None:
    for p in sorted(d.iterdir()):
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def time_copy(src: Path, dst: Path) -> float:
    prime(src)
    dst.mkdir()
    t0 = time.perf_counter()
    for p in sorted(src.iterdir()):
        shutil.copyfile(p, dst / p.name)
    fsync_dir(dst)
    dt = time.perf_counter() - t0
    shutil.rmtree(dst)
    return dt


def time_convert(src: Path, dst: Path, tp: int) -> dict:
    prime(src)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst), str(tp)], capture_output=True,
                          text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"conversion at tp={tp} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["out_bytes"] = sum(p.stat().st_size for p in dst.iterdir())
    shutil.rmtree(dst)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=16000, help="vocab size (51B: 128256; reduced to save disk)")
    ap.add_argument("--workdir", default=None, help="parent folder of the temporary data (default: system temp)")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds (copy, tp1, tp2 interleaved); the best of each is reported")
    ap.add_argument("--source", default=None,
                    help="keep the generated checkpoint in this folder (reused if present) instead of a temp one")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nasrt-bench-convert-", dir=args.workdir))
    try:
        src = Path(args.source) if args.source else tmp / "hf"
        if (src / "model.safetensors.index.json").is_file():
            print(f"reusing {src}", flush=True)
            total = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
            largest = max(n * 2 for n in (math.prod(s) for s in
                                          expected_hf_tensors(load_spec(src)).values()))
        else:
            print(f"writing synthetic 51B-width checkpoint ({PATTERN}, vocab {args.vocab}) to {src}", flush=True)
            total, largest = write_source(src, args.vocab)
        print(f"source: {total / MB:.0f} MiB in {len(list(src.glob('*.safetensors')))} shards, "
              f"largest tensor {largest / MB:.0f} MiB", flush=True)
        copies: list[float] = []
        convs: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.repeat):  # interleaved, so background disk activity hits every measurement alike
            copies.append(time_copy(src, tmp / "copy"))
            for tp in convs:
                convs[tp].append(time_convert(src, tmp / f"ckpt-tp{tp}", tp))
        copy_s = min(copies)
        copy_bps = total / copy_s
        print(f"copy: {copy_s:.2f} s, {copy_bps / MB:.0f} MiB/s (runs: {', '.join(f'{c:.2f}' for c in copies)} s)",
              flush=True)
        ok = True
        for tp, runs in convs.items():
            best = min(runs, key=lambda r: r["seconds"])
            peak = max(r["peak_rss"] for r in runs)
            ratio = (total / best["seconds"]) / copy_bps
            rss_ratio = peak / largest
            rss_ok = peak <= 3 * largest + 500 * MB
            times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
            print(f"convert tp={tp}: {best['seconds']:.2f} s, {total / best['seconds'] / MB:.0f} MiB/s "
                  f"= {ratio:.2f}x copy (runs: {times} s); "
                  f"peak RSS {peak / MB:.0f} MiB = {rss_ratio:.2f}x largest tensor "
                  f"(after imports {best['rss_before'] / MB:.0f} MiB; limit 3x + 500 MiB = "
                  f"{(3 * largest + 500 * MB) / MB:.0f} MiB: {'ok' if rss_ok else 'MISSED'}); "
                  f"wrote {best['out_bytes'] / MB:.0f} MiB", flush=True)
            if tp == 1:
                ok &= ratio >= 0.7
            ok &= rss_ok
        print(f"targets (>= 0.7x copy at tp=1, peak RSS <= 3x largest + 500 MiB): {'met' if ok else 'MISSED'}")
        return 0 if ok else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
