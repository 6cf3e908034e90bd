"""``nasrt check DIR``: TensorRT-LLM 1.2 compatibility of a checkpoint dir, an engine dir or a Triton repository."""

from __future__ import annotations

import argparse
import json

from nasrt.deploy.check import TARGETS, check_dir

HELP = ("check a TensorRT-LLM checkpoint dir, engine dir or Triton repository against TensorRT-LLM 1.2's loading "
        "rules (metadata only; exit 2 on any problem)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="checkpoint dir (nasrt convert / quantize), engine dir (nasrt build) or Triton "
                   "repository (nasrt triton)")
    p.add_argument("--target", choices=TARGETS, help="what DIR is (detected from its files when omitted)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    report = check_dir(args.dir, args.target)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for problem in report.problems:
            print(f"nasrt check: error: {problem.line()}")
        if report.ok:
            print(f"{report.path}: {report.target} OK (TensorRT-LLM 1.2)")
    return 0 if report.ok else 2
