"""Output files written safely, and file-system errors said in one line.

Every output goes to a temporary name beside its target (``.NAME.tmpPID.SUFFIX``, the suffix kept
so writers that pick a format from it still work), is fsynced, and is renamed over the target only
when it was written completely: a failing run never replaces an existing file, and a killed one
leaves at most a stale temp file, which :func:`remove_stale_temps` clears.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMP_NAME = re.compile(r"\..+\.tmp(\d+)(\.\w+)?")
"""Temp files of this module (and of the older ``.NAME.tmpPID`` form); group 1 is the writer's PID."""


def temp_path(path: str | os.PathLike) -> Path:
    """The temporary name this process writes ``path`` under."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PendingFile:
    """The output ``path`` while it is written, under the temp name ``tmp``: :meth:`commit` fsyncs it
    and renames it over ``path``; :meth:`discard` removes it (``path`` keeps its old content)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path)

    def commit(self) -> None:
        fsync_path(self.tmp)
        os.replace(self.tmp, self.path)
        fsync_path(self.path.parent)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path to write ``path`` to; committed (see :class:`PendingFile`) when the block
    succeeds, discarded when it raises."""
    pending = PendingFile(path)
    try:
        yield pending.tmp
        pending.commit()
    finally:
        pending.discard()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temp files that killed writers (other processes) left directly in ``folder``; returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir()
             if (m := TEMP_NAME.fullmatch(p.name)) and int(m.group(1)) != os.getpid() and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def os_error_line(error: OSError) -> str:
    """One line naming the path(s) and the cause of a file-system error."""
    cause = error.strerror or str(error)
    if error.filename is None:
        return cause
    paths = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else f"{error.filename}"
    return f"{paths}: {cause}"
