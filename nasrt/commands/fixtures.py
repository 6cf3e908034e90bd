"""``nasrt fixtures``: create the real SmolLM2 fixture and synthetic / config-only test models."""

from __future__ import annotations

import argparse
from pathlib import Path

from nasrt.fixtures import DEFAULT_CACHE, SYNTHETIC, smollm2_dir, write_config_only, write_synthetic
from nasrt.presets import RELEASED

HELP = "create test models: the real SmolLM2-135M-Instruct, synthetic DeciLM checkpoints, released configs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", default="smollm2",
                   choices=["smollm2", *sorted(SYNTHETIC), *sorted(RELEASED)])
    p.add_argument("--output_dir", help="where to write (default: the cache folder)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.what == "smollm2":
        out = smollm2_dir(args.output_dir)
    elif args.what in SYNTHETIC:
        out = write_synthetic(args.output_dir or Path(DEFAULT_CACHE) / "models" / args.what, args.what, args.seed)
    else:
        out = write_config_only(args.what, args.output_dir or Path(DEFAULT_CACHE) / "models" / args.what)
    print(out)
    return 0
