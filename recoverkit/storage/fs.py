"""File-system operations of the local tiers, as one injectable object.

Every syscall the commit protocol, discovery and retention make goes through a
:class:`LocalFS`, so tests and benchmarks wrap it (``storage.faults.FaultyFS``) to inject
ENOSPC, EIO, a failed rename or a crash at an exact point, instead of patching imports.
Every write here is followed by ``fsync``; every rename by an ``fsync`` of the directory.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

from .._native import engine

__all__ = ["LocalFS"]


class LocalFS:
    """Durable file operations on a POSIX file system.

    Example:
        >>> fs = LocalFS()
        >>> import tempfile; d = tempfile.mkdtemp()
        >>> fs.write_file(d + "/x", b"hi"); fs.read_file(d + "/x")
        b'hi'
    """

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def mkdir(self, path: str) -> None:
        """Create one directory; FileExistsError if it is there (an atomic claim)."""
        os.mkdir(path)

    def write_file(self, path: str, data: bytes) -> None:
        """Create or truncate ``path``, write all of ``data`` and fsync it."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_file(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        return sorted(os.listdir(path))

    def size(self, path: str) -> int | None:
        """Size of a regular file, or None if it does not exist."""
        try:
            return os.stat(path).st_size
        except FileNotFoundError:
            return None

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def remove(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass

    def check_writable(self, path: str) -> None:
        """Raise OSError if new files cannot be created and synced in ``path``."""
        probe = os.path.join(path, f".probe-{os.getpid()}")
        self.write_file(probe, b"recoverkit")
        self.remove(probe)

    def write_segment(
        self, path: str, items: Sequence[tuple[int, int, int]], *, direct: bool = False, crc: bool = False
    ) -> list[int] | None:
        """Write ``(file_offset, src_ptr, nbytes)`` items into ``path`` and fsync it.

        With ``crc=True`` returns each item's CRC-32C, computed in the same pass as the write.
        """
        out = engine.write_segment(path, list(items), direct=direct, fsync=True, crc=crc)
        return None if out is None else list(out)

    def read_segment(self, path: str, items: Sequence[tuple[int, int, int, int]]) -> list[int]:
        """Read ``(file_offset, dst_ptr, nbytes, expected_crc)`` items, verifying checksums."""
        return list(engine.read_segment(path, list(items)))

