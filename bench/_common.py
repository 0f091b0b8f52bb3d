"""Small helpers the benchmark scenarios share: fsync by path, sizes on disk, old outputs, a free port.

The measurement primitives (aligned buffers, memcpy, plain write+fsync and read, dropping the page
cache, timing loops) live in :mod:`bench.bench_limits`; the machine description and ``median`` in
:mod:`bench.machine`; publishing results in :mod:`bench.report`. This module holds what is left
over and repeated across scenarios, none of it a measurement of its own:

* :func:`fsync_file` / :func:`fsync_dir`: open a path, ``fsync`` it, close it;
* :func:`tree_bytes`: bytes of every file below a directory;
* :func:`keep_last`: delete the oldest of a list of checkpoint files or directories;
* :func:`free_port`: a free TCP port on 127.0.0.1 (for a gloo rendezvous).

It imports nothing beyond the standard library.
"""

from __future__ import annotations

import os
import shutil
import socket

__all__ = ["fsync_file", "fsync_dir", "tree_bytes", "keep_last", "free_port"]


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """``fsync`` of the file at ``path`` (opened read-only): its data and metadata are durable."""
    _fsync(path, os.O_RDONLY)


def fsync_dir(path: str) -> None:
    """``fsync`` of the directory at ``path``: the names created or renamed in it are durable."""
    _fsync(path, os.O_RDONLY | os.O_DIRECTORY)


def tree_bytes(path: str) -> int:
    """Bytes of every file below ``path`` (files that vanish meanwhile count 0)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


def keep_last(paths: list[str], n: int) -> None:
    """Delete the oldest of ``paths`` (files or directories) until ``n`` are left; the list shrinks too."""
    while len(paths) > n:
        p = paths.pop(0)
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.unlink(p)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
