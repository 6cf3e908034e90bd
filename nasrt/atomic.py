"""Atomic outputs: every directory and file nasrt writes goes to a temporary sibling and is renamed into place only
when complete. Outputs never overlap an input, an existing output is replaced only with ``--overwrite``, and the
temporary siblings a killed run left behind (``.NAME.tmp-PID-xxxxxxxx`` of a dead PID) are named on the next run
and removed with ``--overwrite``."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from nasrt.errors import NasrtError, OutputExistsError

log = logging.getLogger(__name__)

#: ``.NAME.tmp-PID-TAG`` (being written) and ``.NAME.old-PID-TAG`` (the replaced output, during the final swap).
_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")
_BLOCKED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Inputs = Iterable["str | Path | None"]


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents or a in b.parents


def check_not_input(final: str | Path, inputs: Inputs = (), flag: str = "--output_dir") -> None:
    """Refuse an output that is an input, lies inside one or contains one."""
    final = Path(final)
    for src in inputs:
        if src and _same_or_inside(final, Path(src)):
            raise NasrtError(f"{flag} {final} overlaps the input {src}; inputs are never modified")


def _started_at(pid: int) -> float | None:
    """Start time (epoch seconds) of process ``pid`` from /proc (Linux), None where unknown."""
    try:
        stat_fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + int(stat_fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _writer_alive(pid: int, sibling: Path) -> bool:
    """Whether the process that created ``sibling`` still runs (a reused PID that started later does not count)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _started_at(pid)
    with contextlib.suppress(OSError):
        if started is not None and started > sibling.lstat().st_mtime + 2:
            return False
    return True


def _size(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


def stale_siblings(final: str | Path) -> list[Path]:
    """Temporary siblings of ``final`` whose writing process is gone (an interrupted or killed run)."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    out = []
    for entry in final.parent.iterdir():
        m = _SIBLING.match(entry.name)
        if m and m["name"] == final.name and not _writer_alive(int(m["pid"]), entry):
            out.append(entry)
    return sorted(out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def handle_stale(final: str | Path, overwrite: bool) -> list[Path]:
    """Warn about the stale temporary siblings of ``final``; with ``overwrite`` remove them. Returns them."""
    final = Path(final)
    stale = stale_siblings(final)
    if not stale:
        return stale
    desc = ", ".join(f"{p} ({_size(p) / 2**20:.1f} MiB"
                     f"{', the previous output' if '.old-' in p.name and not final.exists() else ''})"
                     for p in stale)
    if overwrite:
        for p in stale:
            _remove(p)
        log.warning("removed %d temporary sibling(s) of %s left by an interrupted run (--overwrite): %s",
                    len(stale), final, desc)
    else:
        log.warning("%s: %d temporary sibling(s) left by an interrupted run: %s; pass --overwrite to remove them",
                    final, len(stale), desc)
    return stale


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP while a cleanup or the final rename runs (delivered right after)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_output_dir(final: str | Path, overwrite: bool = False, inputs: Inputs = (),
                      flag: str = "--output_dir") -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success it replaces ``final``.

    ``final`` must not exist unless ``overwrite``; it must not overlap any of ``inputs``. On any exception
    (including KeyboardInterrupt and SIGTERM, see :func:`nasrt.cli.main`) the temporary directory is removed and
    ``final`` is left untouched. Stale siblings of earlier killed runs are reported (removed with ``overwrite``).
    """
    final = Path(final)
    check_not_input(final, inputs, flag)
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{flag} {final} already exists (pass --overwrite to replace it)")
    handle_stale(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = _tag()
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    with _signals_blocked():
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        with _signals_blocked():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{tag}"
    with _signals_blocked():
        if final.exists() or final.is_symlink():
            final.rename(old)
        tmp.rename(final)
        if old.exists() or old.is_symlink():
            _remove(old)


def check_output_file(final: str | Path, overwrite: bool = False, inputs: Inputs = (),
                      flag: str = "--output") -> Path:
    """Refuse a file output that is a directory, a non-regular file, an existing file (unless ``overwrite``) or
    an input / a path inside an input. Cheap: call it before long work, :func:`atomic_output_file` repeats it."""
    final = Path(final)
    if not final.name or final.name in (".", ".."):
        raise NasrtError(f"{flag} {final!s}: give a file name")
    check_not_input(final, inputs, flag)
    if final.is_dir():
        raise NasrtError(f"{flag} {final} is a directory; give a file name")
    if os.path.lexists(final):
        if final.exists() and not final.is_file():
            raise NasrtError(f"{flag} {final} exists and is not a regular file")
        if not overwrite:
            raise OutputExistsError(f"{flag} {final} already exists (pass --overwrite to replace it)")
    if final.parent.exists() and not final.parent.is_dir():
        raise NasrtError(f"{flag} {final}: {final.parent} is not a directory")
    return final


@contextlib.contextmanager
def atomic_output_file(final: str | Path, overwrite: bool = False, inputs: Inputs = (),
                       flag: str = "--output") -> Iterator[Path]:
    """Yield a temporary sibling path of the file ``final`` (not yet created); on success it replaces ``final``
    (``os.replace``), on any exception it is removed. Same rules as :func:`check_output_file`."""
    final = check_output_file(final, overwrite, inputs, flag)
    handle_stale(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{_tag()}"
    try:
        yield tmp
        if not tmp.is_file():
            raise NasrtError(f"{flag} {final}: nothing was written")
        with _signals_blocked():
            os.replace(tmp, final)
    except BaseException:
        with _signals_blocked():
            tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(final: str | Path, text: str, overwrite: bool = False, inputs: Inputs = (),
                      flag: str = "--output", encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``final`` through :func:`atomic_output_file`."""
    return write_bytes_atomic(final, text.encode(encoding), overwrite, inputs, flag)


def write_bytes_atomic(final: str | Path, data: bytes, overwrite: bool = False, inputs: Inputs = (),
                       flag: str = "--output") -> Path:
    """Write ``data`` to ``final`` through :func:`atomic_output_file`."""
    with atomic_output_file(final, overwrite, inputs, flag) as tmp, open(tmp, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(final)


def json_text(obj: object, indent: int | None = 2, where: str = "JSON output") -> str:
    """``obj`` as strict JSON text: NaN / Infinity are refused (``allow_nan=False``), never written as bare
    ``NaN`` that no JSON parser accepts. Every JSON file nasrt writes goes through here."""
    try:
        return json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError as exc:
        raise NasrtError(f"{where}: refusing to write a non-finite number as JSON ({exc})") from None
    except RecursionError:
        raise NasrtError(f"{where}: value nested too deeply to write as JSON") from None


def write_json(path: str | Path, obj: object, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (:func:`json_text`) to ``path`` (a file inside an atomic output dir)."""
    path = Path(path)
    path.write_text(json_text(obj, indent, str(path)) + "\n", encoding="utf-8")
    return path
