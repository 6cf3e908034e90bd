"""What ``nasrt derive`` reports: ``derive_report.json``, ``derive_report.png`` (per-layer choices, predicted vs
measured cost) and an ``nasrt inspect``-style table (``derive_table.txt``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nasrt.arch import ModelSpec
from nasrt.derive.library import TIME_MODEL, Candidate, Target, candidate_costs, global_costs, spec_costs
from nasrt.inspect import format_inspection, inspect_spec

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_PNG, REPORT_TABLE = "derive_report.json", "derive_report.png", "derive_table.txt"


def _frac(spec: ModelSpec, parent: ModelSpec, target: Target) -> dict[str, float]:
    c, p = spec_costs(spec, target), spec_costs(parent, target)
    return {"params": c.params / p.params, "kv": c.kv_heads / max(p.kv_heads, 1), "time": c.time_s / p.time_s}


def build_report(*, spec: ModelSpec, derived: ModelSpec, libs, scores, chosen: list[tuple[Candidate, Candidate]],
                 budget: dict[str, float], limits: dict[str, float], target: Target,
                 variants: dict[str, ModelSpec], perplexity: dict[str, float], data: dict[str, Any],
                 options: dict[str, Any], timings: dict[str, float], peak_rss_bytes: int, parent_dir: str
                 ) -> dict[str, Any]:
    """The report as a JSON-ready dict; "measured" costs are recomputed from the written config."""
    parent = spec_costs(spec, target)
    layers = []
    glob = global_costs(spec, target)
    predicted = {"params": glob.params, "kv": 0, "time": glob.time_s}
    for i, (a, f) in enumerate(chosen):
        row: dict[str, Any] = {"layer": i, "attention": a.name, "ffn": f.name, "candidates": {}}
        for sub, pick in (("attention", a), ("ffn", f)):
            row["candidates"][sub] = [
                {"name": c.name, "kl": scores[i][sub][c.name], **_costs(candidate_costs(spec, i, c, target)),
                 "chosen": c.name == pick.name} for c in libs[i][sub]]
            cc = candidate_costs(spec, i, pick, target)
            predicted["params"] += cc.params
            predicted["kv"] += cc.kv_heads
            predicted["time"] += cc.time_s
        row["score"] = scores[i]["attention"][a.name] + scores[i]["ffn"][f.name]
        layers.append(row)
    measured = spec_costs(derived, target)
    return {
        "parent": {"dir": parent_dir, **_costs(parent)},
        "budget": budget, "limits": limits,
        "target": {"batch": target.batch, "seq": target.seq, "time_model": TIME_MODEL},
        "predicted": {"params": predicted["params"], "kv_heads": predicted["kv"], "time_s": predicted["time"]},
        "measured": _costs(measured),
        "fractions": {name: _frac(v, spec, target) for name, v in variants.items()},
        "perplexity": perplexity,
        "total_score": sum(r["score"] for r in layers),
        "layers": layers, "data": data, "options": options, "timings_s": timings,
        "peak_rss_bytes": peak_rss_bytes,
    }


def _costs(c) -> dict[str, Any]:
    return {"params": c.params, "kv_heads": c.kv_heads, "time_s": c.time_s}


def format_table(report: dict[str, Any], derived: ModelSpec, path: str) -> str:
    """``nasrt inspect``'s table of the derived model, followed by budgets, fractions and perplexities."""
    lines = [format_inspection(inspect_spec(derived, path)), ""]
    lines.append("budget: " + ", ".join(f"{k} <= {v:g}" for k, v in report["budget"].items()))
    head = f"{'model':<32} {'params':>7} {'kv':>7} {'time':>7} {'perplexity':>11}"
    lines += [head, "-" * len(head)]
    for name, fr in report["fractions"].items():
        ppl = report["perplexity"].get(name)
        lines.append(f"{name:<32} {fr['params']:>7.3f} {fr['kv']:>7.3f} {fr['time']:>7.3f} "
                     f"{ppl if ppl is None else f'{ppl:.3f}':>11}")
    lines.append(f"(fractions of the parent; time = modelled decode step at batch {report['target']['batch']} x "
                 f"{report['target']['seq']} tokens)")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Per-layer chosen blocks (KV heads, FFN width) and predicted vs measured cost fractions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    x = [r["layer"] for r in layers]
    parent = report["parent"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(10, 9))
    kinds = {"linear": -1, "no_op": -2}

    def kv_val(name: str) -> int:
        return int(name[2:]) if name.startswith("kv") else kinds[name]

    def width_val(name: str) -> int:
        return int(name[3:]) if name.startswith("mlp") else kinds[name]

    ax1.bar(x, [kv_val(r["attention"]) for r in layers], color=["C0" if r["attention"].startswith("kv") else
                                                                 "C3" for r in layers])
    ax1.set_ylabel("KV heads (-1 linear, -2 no-op)")
    ax1.set_title("chosen attention per layer")
    ax2.bar(x, [width_val(r["ffn"]) for r in layers], color=["C1" if r["ffn"].startswith("mlp") else "C3"
                                                             for r in layers])
    ax2.set_ylabel("FFN width (-1 linear, -2 no-op)")
    ax2.set_title("chosen FFN per layer")
    names = ["params", "kv_heads", "time_s"]
    pred = [report["predicted"][n] / max(parent[n], 1e-30) for n in names]
    meas = [report["measured"][n] / max(parent[n], 1e-30) for n in names]
    idx = range(len(names))
    ax3.bar([i - 0.2 for i in idx], pred, width=0.4, label="predicted (MIP)")
    ax3.bar([i + 0.2 for i in idx], meas, width=0.4, label="measured (written config)")
    for k, n in enumerate(("params", "kv", "time")):
        if n in report["budget"]:
            ax3.hlines(report["budget"][n], k - 0.4, k + 0.4, colors="k", linestyles="dashed")
    ax3.set_xticks(list(idx), ["params", "KV cache", "decode step (modelled)"])
    ax3.set_ylabel("fraction of parent")
    ax3.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_report(out_dir: Path, report: dict[str, Any], derived: ModelSpec, plot_png: bool = True,
                 display: str = "") -> str:
    """Write the JSON, PNG and table into ``out_dir``; returns the table (``display`` names the model in it)."""
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=1))
    table = format_table(report, derived, display or str(out_dir))
    (out_dir / REPORT_TABLE).write_text(table + "\n")
    if plot_png:
        plot(report, out_dir / REPORT_PNG)
    return table

