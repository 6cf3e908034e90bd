"""``nasrt fixtures``: create the real SmolLM2 fixture and synthetic / config-only test models."""

from __future__ import annotations

import argparse
from pathlib import Path

from nasrt.errors import OutputExistsError
from nasrt.fixtures import (
    DEFAULT_CACHE,
    SYNTHETIC,
    copy_model_dir,
    smollm2_dir,
    write_config_only,
    write_synthetic,
)
from nasrt.presets import RELEASED

HELP = "create test models: the real SmolLM2-135M-Instruct, synthetic DeciLM checkpoints, released configs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", nargs="?", default="smollm2",
                   choices=["smollm2", *sorted(SYNTHETIC), *sorted(RELEASED)])
    p.add_argument("--output_dir", help="model directory to write, atomically (default: in the cache folder, "
                   "which is refreshed in place)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir atomically")


def run(args: argparse.Namespace) -> int:
    # Without --output_dir the model lands in nasrt's own cache, which is refreshed; a user's directory is
    # written only when new, or with --overwrite, and always atomically.
    out_dir = Path(args.output_dir) if args.output_dir else Path(DEFAULT_CACHE) / "models" / args.what
    overwrite = args.overwrite or not args.output_dir
    if args.output_dir and not args.overwrite and (out_dir.exists() or out_dir.is_symlink()):
        raise OutputExistsError(f"--output_dir {out_dir} already exists (pass --overwrite to replace it)")
    if args.what == "smollm2":
        cached = smollm2_dir()
        if args.output_dir and out_dir.resolve() != cached.resolve():
            out = copy_model_dir(cached, out_dir, overwrite=args.overwrite)
        else:
            out = cached
    elif args.what in SYNTHETIC:
        out = write_synthetic(out_dir, args.what, args.seed, overwrite=overwrite)
    else:
        out = write_config_only(args.what, out_dir, overwrite=overwrite)
    print(out)
    return 0
