"""File-system operations of the local tiers, as one injectable object.

Every syscall the commit protocol, discovery and retention make goes through a
:class:`LocalFS`, so tests and benchmarks wrap it (``storage.faults.FaultyFS``) to inject
ENOSPC, EIO, a failed rename or a crash at an exact point, instead of patching imports.
Every write here is followed by ``fsync``; every rename by an ``fsync`` of the directory.
Segment files are written and read by the engine the file system was given
(``LocalFS(engine=)``, the Checkpointer's), the process-wide default otherwise; wrappers
(``FaultyFS``, the reader's read-only file system) use their inner file system's.

Symbolic links and special files (DESIGN invariant 8): a checkpoint root is the user's and
may itself be a symlink, but nothing *inside* a root is trusted. So:

* nothing is read, written, created or truncated through a symlink: every open uses
  ``O_NOFOLLOW``; files that must be new are created with ``O_CREAT | O_EXCL``;
* nothing blocks on a FIFO, socket or device: every open is ``O_NONBLOCK`` and is checked with
  ``fstat`` (after an ``lstat``, so a device is not even opened); anything but a regular file
  is refused with an error that names the path and what was found there;
* :meth:`LocalFS.size`, :meth:`LocalFS.is_file`, :meth:`LocalFS.is_dir` and
  :meth:`LocalFS.exists` look at the name itself (``lstat``), not at what a symlink points to;
* :meth:`LocalFS.remove_tree` unlinks a symlink (never touching its target) and deletes a
  real directory with ``shutil.rmtree``, which on Linux never follows a symlink inside it.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from .. import _native
from ..errors import IntegrityError, StorageError
from .layout import TMP_PREFIX

__all__ = ["DEFAULT_MAX_READ_BYTES", "LocalFS", "file_kind", "open_regular"]

#: The default limit of :meth:`LocalFS.read_file` (1 GiB). A manifest of a million records
#: is a few hundred MiB; a larger "manifest" is refused before a byte of it is read, so a
#: hostile file cannot make a reader allocate whatever it claims.
DEFAULT_MAX_READ_BYTES = 1 << 30

_KINDS = (
    (stat.S_ISREG, "a regular file"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def file_kind(mode: int) -> str:
    """What an ``st_mode`` describes, in words.

    Example:
        >>> import stat; file_kind(stat.S_IFIFO | 0o644)
        'a FIFO'
    """
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _lkind(path: str) -> str | None:
    """What ``path`` itself is (not what a symlink points to), or None if nothing is there."""
    try:
        return file_kind(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return None


def open_regular(
    path: str, flags: int, refuse: Callable[[str, str], BaseException], *, mode: int = 0o644
) -> tuple[int, os.stat_result]:
    """Open ``path`` as a regular file without following a symlink and without blocking.

    ``flags`` are the access flags (``O_RDONLY``, ``O_RDWR | O_CREAT``, ...); ``O_NOFOLLOW``,
    ``O_NONBLOCK`` and ``O_CLOEXEC`` are added. A symlink, directory, FIFO, socket or device
    is refused with ``refuse(path, kind)`` (kind: "a FIFO", "a symbolic link", ...): it is
    looked at with ``lstat`` first, so a device is never opened, and checked again with
    ``fstat`` on the open descriptor, so a file swapped in between is caught as well.
    Returns the descriptor and its ``fstat``; the caller closes it.
    """
    if not flags & os.O_EXCL:  # O_CREAT | O_EXCL opens nothing that exists: FileExistsError
        kind = _lkind(path)
        if kind is not None and kind != "a regular file":
            raise refuse(path, kind)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR, errno.EWOULDBLOCK):
            kind = _lkind(path)
            if kind is not None and kind != "a regular file":
                raise refuse(path, kind) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(path, file_kind(st.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _refuse_read(path: str, kind: str) -> IntegrityError:
    return IntegrityError(
        f"{path}: found {kind}, expected a regular file (recoverkit never reads through a symbolic "
        "link or from a special file)",
        path=path,
    )


def _refuse_write(path: str, kind: str) -> StorageError:
    code = errno.ELOOP if kind == "a symbolic link" else errno.EINVAL
    return StorageError(
        code,
        f"{path}: found {kind}, expected a regular file or nothing (recoverkit never writes "
        "through a symbolic link or into a special file); remove it",
        path,
    )


class LocalFS:
    """Durable file operations on a POSIX file system that never follow a symlink in a root.

    Args:
        engine: the copy/IO engine that writes and reads segment files (the one a
            Checkpointer was given); None: the process-wide default
            (:func:`recoverkit._native.resolve`). It is an instance attribute only, so a
            wrapper that does not call this ``__init__`` reaches its inner file system's.

    Example:
        >>> fs = LocalFS()
        >>> import tempfile; d = tempfile.mkdtemp()
        >>> fs.write_file(d + "/x", b"hi"); fs.read_file(d + "/x")
        b'hi'
    """

    def __init__(self, engine: Any = None) -> None:
        self.engine = _native.resolve(engine)

    def makedirs(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)

    def mkdir(self, path: str) -> None:
        """Create one directory; FileExistsError if anything (a symlink too) is there."""
        os.mkdir(path)

    def write_file(self, path: str, data: bytes, *, new: bool = False) -> None:
        """Write all of ``data`` to ``path`` and fsync it.

        With ``new=True`` the file must not exist (``O_CREAT | O_EXCL``: FileExistsError if
        anything, a symlink included, has the name). Otherwise an existing regular file with
        no other hard link is truncated and rewritten. A symlink, a special file or a file
        with other hard links is never opened for writing: StorageError naming what is there.
        """
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if new else 0)
        fd, st = open_regular(path, flags, _refuse_write)
        try:
            if not new:
                if st.st_nlink > 1:
                    raise StorageError(
                        errno.EMLINK,
                        f"{path}: has {st.st_nlink} hard links; rewriting it would change the "
                        "other names too (remove it)",
                        path,
                    )
                os.ftruncate(fd, 0)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_file(self, path: str, *, max_bytes: int = DEFAULT_MAX_READ_BYTES) -> bytes:
        """All bytes of the regular file ``path``, at most ``max_bytes`` of them.

        Never blocks and never follows a symlink: a FIFO, socket, device, directory or
        symlink raises :class:`IntegrityError` naming the path and what was found; so does a
        file larger than ``max_bytes`` (default :data:`DEFAULT_MAX_READ_BYTES`, 1 GiB),
        before any of it is read. A missing file raises FileNotFoundError.
        """
        fd, st = open_regular(path, os.O_RDONLY, _refuse_read)
        try:
            if st.st_size > max_bytes:
                raise IntegrityError(
                    f"{path}: {st.st_size} bytes, more than the {max_bytes} bytes this file may have",
                    path=path,
                )
            chunks: list[bytes] = []
            total = 0
            while total <= max_bytes:  # the file may grow while it is read: stay bounded
                chunk = os.read(fd, max(st.st_size - total, 0) + 65536)
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                total += len(chunk)
            raise IntegrityError(
                f"{path}: grew past the {max_bytes} bytes this file may have while read", path=path
            )
        finally:
            os.close(fd)

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
        """Size of the regular file ``path``; None if nothing has that name.

        The name itself is looked at (``lstat``): a symlink (whatever it points to), a
        directory, FIFO, socket or device is not a usable file and raises
        :class:`IntegrityError` naming it, so a planted symlink in place of a segment file is
        a fault of its step rather than a way to read outside the root.
        """
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not stat.S_ISREG(st.st_mode):
            raise _refuse_read(path, file_kind(st.st_mode))
        return st.st_size

    def is_file(self, path: str) -> bool:
        """Whether ``path`` itself is a regular file (a symlink to one is not)."""
        try:
            return stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            return False

    def is_dir(self, path: str, *, follow_symlinks: bool = False) -> bool:
        """Whether ``path`` is a directory.

        By default the name itself (``lstat``): a symlink to a directory is not one, so no
        listing or deletion inside a root wanders through it. ``follow_symlinks=True`` is for
        the root itself, which the user may have made a symlink.
        """
        try:
            st = os.stat(path) if follow_symlinks else os.lstat(path)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode)

    def exists(self, path: str) -> bool:
        """Whether anything has the name ``path`` (a dangling symlink too)."""
        return os.path.lexists(path)

    def remove(self, path: str) -> None:
        """Unlink ``path`` (a symlink itself, never its target); nothing there is fine."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def remove_tree(self, path: str) -> None:
        """Delete ``path``: a real directory with all it holds, anything else by unlinking it.

        A symlink is unlinked, its target untouched (a leftover ``.tmp-*`` symlink must not
        make every later start-up fail, nor lead a deletion out of the root). Inside a
        directory ``shutil.rmtree`` unlinks symlinks without following them, and its
        descriptor-based walk on Linux also defeats a directory swapped for a symlink midway.
        """
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            self.remove(path)
            return
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass

    def check_writable(self, path: str) -> None:
        """Raise OSError if new files cannot be created and synced in ``path``.

        The probe has an unpredictable name and is created with ``O_EXCL``, so nothing
        planted in ``path`` is written through; its ``.tmp-`` prefix lets the start-up
        cleanup remove it if the process dies between the two calls.
        """
        probe = os.path.join(path, f"{TMP_PREFIX}probe-{uuid.uuid4().hex[:12]}")
        self.write_file(probe, b"recoverkit", new=True)
        self.remove(probe)

    def write_segment(
        self,
        path: str,
        items: Sequence[tuple[int, int, int]],
        *,
        direct: bool = False,
        crc: bool = False,
    ) -> list[int] | None:
        """Write ``(file_offset, src_ptr, nbytes)`` items into ``path`` and fsync it.

        With ``crc=True`` returns each item's CRC-32C, computed in the same pass as the write.
        """
        out = self.engine.write_segment(path, list(items), direct=direct, fsync=True, crc=crc)
        return None if out is None else list(out)

    def read_segment(self, path: str, items: Sequence[tuple[int, int, int, int]]) -> list[int]:
        """Read ``(file_offset, dst_ptr, nbytes, expected_crc)`` items, verifying checksums."""
        return list(self.engine.read_segment(path, list(items)))
