"""Atomic file writes: a reader, or a run killed mid-write, never sees half a file.

The lowest module of the lab (it imports nothing of it), so the dataset, run-directory and report
layers all write through the same function.

Atomic is not durable. The rename alone protects against a killed process: the page cache keeps the
file. Only an OS crash or power loss can lose data that was not synced, and then a renamed file may
come back empty or missing. `write_atomic` fsyncs each file, unless it runs inside `deferred_sync()`:
there the caller orders the writes and makes them durable in batches with `sync()`, one call for
many files instead of an fsync each (lab.study does this for run directories; see its `_finish`).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

# True inside deferred_sync(): write_atomic leaves durability to the caller's sync(). A context
# variable, so another thread's writes are never deferred by accident.
_deferred = contextvars.ContextVar("lab_atomic_deferred", default=False)
# sync(2) returns only once the data is written on Linux; POSIX lets it return earlier (and Windows
# has none), so elsewhere write_atomic keeps its fsync per file even inside deferred_sync().
_SYNC_WAITS = sys.platform.startswith("linux") and hasattr(os, "sync")
# The process's umask, read once (reading it means setting it): new files get 0666 & ~umask, as open() gives.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write via a temporary file in the same directory and rename it into place.

    The temporary file is fsynced before the rename unless inside `deferred_sync()`. A symlink's target
    is what is replaced; a device or a pipe (`--csv /dev/stdout`) is written directly.
    """
    data = data.encode() if isinstance(data, str) else data
    # /dev/stdout, /dev/fd/N, /proc/self/fd/N: one of this process's own streams, whatever it leads to (a
    # terminal, a pipe, or a file the shell redirected it to, which a rename would cut off from the rest of
    # the output, and a second open would overwrite): written to that descriptor, after what Python buffered.
    fd = _own_stream(path)
    if fd is not None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        return
    try:
        special = not stat.S_ISREG(os.stat(path).st_mode)  # (what a symlink points to)
    except FileNotFoundError:
        special = False
    if special:  # a device or a pipe: written through, where a rename would put a file in its place
        with open(path, "wb") as f:  # (a directory raises IsADirectoryError here, as the rename would)
            f.write(data)
        return
    path = Path(os.path.realpath(path))  # a symlink's target is replaced, not the link
    try:  # the file keeps its mode; a new one gets what open() would give it (mkstemp makes it 0600)
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_UMASK
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if not _deferred.get():
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _own_stream(path) -> int | None:
    """The descriptor `path` names when it is one of this process's streams (/dev/stdout, /dev/stderr,
    /dev/fd/N, /proc/self/fd/N), else None."""
    text = os.path.abspath(path)
    named = {"/dev/stdout": 1, "/dev/stderr": 2}
    if text in named:
        return named[text]
    m = re.fullmatch(r"/(?:dev/fd|proc/self/fd)/(\d+)", text)
    return int(m.group(1)) if m else None


def sync() -> None:
    """Make every file written so far durable: one sync(2) instead of an fsync per file (Linux)."""
    if _SYNC_WAITS:
        os.sync()


@contextlib.contextmanager
def deferred_sync() -> Iterator[None]:
    """Inside, write_atomic skips its fsync; leaving calls sync(), so nothing stays undurable.

    The caller calls sync() itself wherever one file must not become durable before others (a
    result that vouches for the files it was computed from). Nesting is allowed.
    """
    if not _SYNC_WAITS:
        yield  # no sync(2) that waits: keep the fsync per file
        return
    token = _deferred.set(True)
    try:
        yield
    finally:
        _deferred.reset(token)
        sync()
