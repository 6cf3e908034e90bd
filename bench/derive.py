#!/usr/bin/env python3
"""``nasrt derive`` benchmark on SmolLM2-135M-Instruct: peak RSS of the whole derive run next to the parent's fp32
weight bytes, and next to a peer measured in the same run: loading the same parent whole in transformers (fp32)
and running one forward over the scoring batch. Each side runs in a fresh child process, so its peak RSS
(``VmHWM``) is its own.

Issue 11 target: peak RSS of the derive run <= 3x the fp32 parent's weight bytes (the layer-by-layer design).
Also prints the wall time of each derive phase and the resulting budgets and perplexities.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HWM = r"""
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
"""

DERIVE = HWM + r"""
import json, sys
from nasrt.derive import DeriveOptions, derive
from nasrt.derive.library import Target
model_dir, out, budget, tp, score_size = sys.argv[1:6]
from nasrt.derive.search import parse_budget
opts = DeriveOptions(budget=parse_budget(budget), tp=int(tp), score_size=int(score_size))
res = derive(model_dir, out, opts, progress=False)
r = res.report
print(json.dumps({"peak_rss": hwm(), "timings": r["timings_s"], "fractions": r["fractions"],
                  "perplexity": r["perplexity"]}))
"""

PEER = HWM + r"""
import json, sys, torch
from transformers import LlamaForCausalLM
model_dir, score_size, seq = sys.argv[1:4]
m = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
with torch.no_grad():
    m(input_ids=torch.randint(0, 1000, (int(score_size), int(seq))))
print(json.dumps({"peak_rss": hwm()}))
"""


def child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="params=0.85,kv=0.6")
    ap.add_argument("--tp", default="1")
    ap.add_argument("--score_size", default="8")
    args = ap.parse_args()
    from nasrt.arch import load_spec
    from nasrt.fixtures import smollm2_dir

    model = smollm2_dir()
    spec = load_spec(model)
    fp32_bytes = spec.num_params * 4
    with tempfile.TemporaryDirectory(prefix="nasrt-bench-derive-") as tmp:
        d = child(DERIVE, str(model), str(Path(tmp) / "derived"), args.budget, args.tp, args.score_size)
    peer = child(PEER, str(model), args.score_size, "64")
    mb = 1e6
    print(f"parent: SmolLM2-135M-Instruct, {spec.num_params:,} parameters, fp32 weights {fp32_bytes / mb:.0f} MB")
    print(f"derive --budget {args.budget} --tp {args.tp} --score_size {args.score_size}: "
          f"peak RSS {d['peak_rss'] / mb:.0f} MB = {d['peak_rss'] / fp32_bytes:.2f}x the fp32 parent (limit 3x)")
    print(f"peer (whole parent in transformers fp32 + one forward): peak RSS {peer['peak_rss'] / mb:.0f} MB; "
          f"derive / peer = {d['peak_rss'] / peer['peak_rss']:.2f}x")
    print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in d["timings"].items()))
    for name, fr in d["fractions"].items():
        ppl = d["perplexity"].get(name)
        print(f"  {name:<32} params {fr['params']:.3f}  kv {fr['kv']:.3f}  time {fr['time']:.3f}  "
              f"perplexity {ppl:.3f}" if ppl else f"  {name}")


if __name__ == "__main__":
    main()
