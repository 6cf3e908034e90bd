"""The ``nasrt`` command line: one entry point, one module per subcommand in ``nasrt/commands/``.

Each command module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Modules
are imported only when their command runs, so ``nasrt inspect`` does not pay for ModelOpt or transformers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

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
    "serve-config": "nasrt.commands.serve_config",
    "check": "nasrt.commands.check",
    "triton": "nasrt.commands.triton",
    "serve": "nasrt.commands.serve",
    "client": "nasrt.commands.client",
    "demo": "nasrt.commands.demo",
    "derive": "nasrt.commands.derive",
}


#: shown by ``nasrt --help`` (plain text: no reStructuredText markup).
DESCRIPTION = ("nasrt: Hugging Face Nemotron-NAS / DeciLM checkpoints to TensorRT-LLM (convert, FP8-quantize, build, "
               "run, serve, plan). 'nasrt COMMAND --help' shows a command's flags.")
#: signals that unwind like Ctrl-C, so that atomic outputs are cleaned up (SIGKILL cannot be caught: the next
#: run names its debris, see :func:`nasrt.atomic.handle_stale`).
TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM / SIGHUP (a subclass of KeyboardInterrupt: every cleanup runs)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def terminate_like_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM / SIGHUP raise :class:`Terminated` (once; repeats are ignored so the cleanup
    can finish). Signals whose handler is not the default one (e.g. ignored by ``nohup``) are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, _frame) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise Terminated(signum)

    old = {}
    for sig in TERMINATING_SIGNALS:
        if signal.getsignal(sig) == signal.SIG_DFL:
            old[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev)


def _module(name: str):
    return importlib.import_module(COMMANDS[name])


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nasrt", description=DESCRIPTION)
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
        with terminate_like_interrupt():
            return int(_module(args.command).run(args) or 0)
    except NasrtError as exc:
        print(f"nasrt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        how = f"terminated ({exc})" if isinstance(exc, Terminated) else "interrupted"
        print(f"nasrt {args.command}: {how}; nothing was left under the output name", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
