"""The ``nasrt`` command line: one entry point, one module per subcommand in :mod:`nasrt.commands`.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Modules
are imported only when their command runs, so ``nasrt inspect`` does not pay for ModelOpt or transformers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from nasrt.errors import NasrtError

#: subcommand -> module (tuple order is the order shown in ``nasrt --help``).
COMMANDS: dict[str, str] = {
    "convert": "nasrt.commands.convert",
    "inspect": "nasrt.commands.inspect",
    "fixtures": "nasrt.commands.fixtures",
    "quantize": "nasrt.commands.quantize",
    "run": "nasrt.commands.run",
    "eval": "nasrt.commands.eval",
    "build": "nasrt.commands.build",
    "plan": "nasrt.commands.plan",
    "triton": "nasrt.commands.triton",
    "client": "nasrt.commands.client",
    "demo": "nasrt.commands.demo",
}


def _module(name: str):
    return importlib.import_module(COMMANDS[name])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nasrt", description=__doc__.splitlines()[0])
    parser.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        mod = _module(name)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """Run ``nasrt [command] ...``; ``command`` fixes the subcommand (used by the top-level scripts)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if command is not None:
        argv = [command, *argv]
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="[nasrt] %(levelname)s %(name)s: %(message)s")
    try:
        return int(_module(args.command).run(args) or 0)
    except NasrtError as exc:
        print(f"nasrt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nasrt {args.command}: interrupted; nothing was left under the output name", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
