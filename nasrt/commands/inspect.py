"""``nasrt inspect DIR``: per-layer architecture table and totals of an HF model or TensorRT-LLM checkpoint."""

from __future__ import annotations

import argparse
import json

from nasrt.inspect import format_inspection, inspect_model

HELP = "per-layer table (attention, KV heads, FFN, width, parameters) and totals of an HF dir or TRT-LLM checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="HF model dir, TensorRT-LLM checkpoint or engine dir (or a config.json)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    report = inspect_model(args.dir)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_inspection(report))
    return 0
