"""Atomic output directories: write into a temporary sibling, rename into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from nasrt.errors import NasrtError, OutputExistsError


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents or a in b.parents


@contextlib.contextmanager
def atomic_output_dir(final: str | Path, overwrite: bool = False,
                      inputs: tuple[str | Path, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``final``; on success it replaces ``final``.

    ``final`` must not exist unless ``overwrite``; it must not overlap any of ``inputs``. On any exception
    (including KeyboardInterrupt) the temporary directory is removed and ``final`` is left untouched.
    """
    final = Path(final)
    for src in inputs:
        if src and _same_or_inside(final, Path(src)):
            raise NasrtError(f"--output_dir {final} overlaps the input {src}; inputs are never modified")
    if final.exists() and not overwrite:
        raise OutputExistsError(f"--output_dir {final} already exists (pass --overwrite to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = final.parent / f".{final.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.parent / f".{final.name}.old-{tag}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)
