"""The raw mappings under the shared-memory slots: buffer addresses, pins, mapped files.

Where it sits: below :mod:`recoverkit.storage.shm_slots` (the slots of one owner: the
writer, the reader's views), which maps every data file through here, and beside
:mod:`recoverkit.storage.shm` (the store), which makes its directories here. The flow::

    _real_dir(dir, create=True)     a directory of its own (not a symlink; a job's is this
                                    user's, 0700; the shared ones 1777, sticky)
    open_regular(path, ..., _refuse / _refuse_read)
                                    the data file opened without following a symlink; the
                                    refusal names what was found instead
    _Mapping(fd, nbytes, write=)    mapped shared (pages populated), its first byte's
                                    address read through the buffer protocol (read-only too)
    _pin(path, +1) ... _pin(path, -1)
                                    per process, per data file: while pinned, no writer of
                                    this process takes the slot (``_pinned``)
    _Mapping.close()                unmapped once no memoryview of it is left (False until then)
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
import threading
from typing import Any

from ..errors import IntegrityError, StorageError
from .fs import file_kind


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p),
    ]  # fmt: skip


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _address(obj: Any) -> int:
    """The address of a buffer's first byte (read-only buffers too); 0 for an empty one."""
    view = _PyBuffer()
    if _get_buffer(obj, ctypes.byref(view), 0) != 0:  # pragma: no cover - raised as an exception
        raise BufferError("no buffer")
    try:
        return int(view.buf or 0)
    finally:
        _release_buffer(ctypes.byref(view))


#: data files this process has mapped read-only, by path -> open views (pins against reuse)
_PINS: dict[str, int] = {}
_PINS_LOCK = threading.Lock()


def _pin(path: str, delta: int) -> None:
    with _PINS_LOCK:
        n = _PINS.get(path, 0) + delta
        if n > 0:
            _PINS[path] = n
        else:
            _PINS.pop(path, None)


def _pinned(path: str) -> bool:
    with _PINS_LOCK:
        return path in _PINS


class _Mapping:
    """One mapping of a data file; closed only when no memoryview of it is left."""

    def __init__(self, fd: int, nbytes: int, *, write: bool) -> None:
        self.nbytes = nbytes
        if nbytes == 0:
            self.mm: mmap.mmap | None = None
            self.address = 0
            return
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
        self.mm = mmap.mmap(fd, nbytes, flags=flags, prot=prot)
        self.address = _address(self.mm)

    def view(self, readonly: bool) -> memoryview:
        if self.mm is None:
            return memoryview(b"" if readonly else bytearray())
        v = memoryview(self.mm)
        return v.toreadonly() if readonly else v

    def close(self) -> bool:
        """Unmap; False (still mapped) while a memoryview of it is alive."""
        if self.mm is None:
            return True
        try:
            self.mm.close()
        except BufferError:
            return False
        self.mm = None
        return True


def _refuse(path: str, kind: str) -> StorageError:
    code = errno.ELOOP if kind == "a symbolic link" else errno.EINVAL
    return StorageError(code, f"{path}: found {kind}, expected a regular file (shared memory is never followed)", path)


def _refuse_read(path: str, kind: str) -> IntegrityError:
    return IntegrityError(f"{path}: found {kind}, expected a regular file", path=path)


def _real_dir(path: str, *, create: bool, shared: bool = False) -> None:
    """``path`` is a directory of its own (not a symlink), created if ``create``.

    ``shared``: a directory every user of the machine creates entries in (``recoverkit/``
    and a node's directory under ``/dev/shm``): made 1777 (sticky, like /tmp). Otherwise a
    job's own (0700): it must belong to this user, so nobody else can plant or swap its
    files.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(path, 0o700)
            if shared:
                os.chmod(path, 0o1777)  # not through the umask
        except FileExistsError:
            pass
        st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(errno.ENOTDIR, f"{path}: found {file_kind(st.st_mode)}, expected a directory", path)
    if not shared and st.st_uid != os.getuid():
        raise StorageError(
            errno.EPERM, f"{path}: belongs to user {st.st_uid}, not this process's user {os.getuid()} (remove it)", path
        )
