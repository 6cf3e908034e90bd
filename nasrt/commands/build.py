"""``nasrt build``: TensorRT-LLM engine from a nasrt checkpoint with a build profile (``build/*.json``)."""

from __future__ import annotations

import argparse

from nasrt.deploy.engine.build import RECORD_NAME, build_engine
from nasrt.deploy.plan import render
from nasrt.deploy.profiles import PROFILE_DIR, list_profiles

HELP = "build a TensorRT-LLM engine with a build profile (checks the checkpoint and the memory plan first)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint_dir", required=True, help="TensorRT-LLM checkpoint (nasrt convert / quantize)")
    p.add_argument("--profile", required=True,
                   help=f"profile name in {PROFILE_DIR} ({', '.join(list_profiles()) or 'none'}) or a .json path")
    p.add_argument("--output_dir", required=True, help="engine directory to write (atomically)")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="check and plan, print the trtllm-build command, build nothing")
    p.add_argument("--force", action="store_true", help="build even if the planner says the profile does not fit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")


def run(args: argparse.Namespace) -> int:
    result = build_engine(args.checkpoint_dir, args.profile, args.output_dir, dry_run=args.dry_run,
                          force=args.force, overwrite=args.overwrite)
    print(f"profile {result.profile.name} ({result.profile.path}): {result.profile.description}")
    print(render(result.plan))
    if args.dry_run:
        print("dry run; the build command would be:")
        print(result.command)
        return 0
    print(f"built {result.output_dir} ({RECORD_NAME} records the profile and the nasrt version)")
    return 0
