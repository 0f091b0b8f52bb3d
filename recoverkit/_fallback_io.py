"""The pure-Python engine's argument checks, raw memory and segment files.

Part of ``recoverkit._fallback`` (which re-exports ``write_segment`` and ``read_segment``):
the mirror of ``native/bindings`` (argument conversion), ``native/src/mem_check.cc``
(msync checks that raw-pointer ranges are mapped) and ``native/src/segment_io.cc`` (segment files),
with the same validation order, the same exceptions and messages, and byte-identical files.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import operator
import os
import stat
from collections.abc import Iterable
from typing import Any

import google_crc32c

from .errors import IntegrityError

__all__ = ["write_segment", "read_segment"]

_I64_MAX = (1 << 63) - 1
_BLOCK = 4096  # O_DIRECT alignment
_BOUNCE = 8 << 20
_PIECE = 1 << 20  # read this much, then checksum it while it is in cache
_PAGE = mmap.PAGESIZE
_MS_ASYNC = getattr(mmap, "MS_ASYNC", 1)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.msync.restype = ctypes.c_int


# ---- arguments ----------------------------------------------------------------------------

def _int(v: Any, name: str) -> int:
    """An integer argument that fits in int64 (TypeError for a non-integer)."""
    v = operator.index(v)
    if not -(1 << 63) <= v <= _I64_MAX:
        raise OverflowError(f"{name} must fit in a signed 64-bit integer, got {v}")
    return v


def _nonneg(v: Any, name: str) -> int:
    v = _int(v, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _crc_value(value: Any, name: str = "value") -> int:
    value = operator.index(value)
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name} must be a 32-bit CRC in [0, 2**32), got {value}")
    return value


def _fs_path(path: Any) -> str:
    """A path-like as str; ValueError for a NUL byte (C would cut the path there)."""
    if b"\0" in os.fsencode(path):
        raise ValueError(f"path contains a NUL byte: {path!r}")
    return os.fsdecode(path)


# ---- raw memory ---------------------------------------------------------------------------

def _at(ptr: int, nbytes: int) -> Any:
    """A ctypes view of ``nbytes`` at address ``ptr`` (no copy)."""
    return (ctypes.c_char * nbytes).from_address(ptr)


def _address_of(mm: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)
    del anchor  # release the buffer export, so the mmap can still be closed
    return addr


def _not_mapped(ptr: int, nbytes: int, what: str) -> OSError:
    return OSError(errno.EFAULT, f"{what} [0x{ptr:x}, 0x{ptr + nbytes:x}) ({nbytes} bytes) is not "
                                 "mapped memory (a freed buffer or a bad pointer)")


def _pages_mapped(first: int, last: int) -> bool:
    """msync(MS_ASYNC) walks the mappings of the range only: ENOMEM at a hole."""
    while True:
        if _libc.msync(first, last - first + _PAGE, _MS_ASYNC) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EAGAIN, errno.EINTR):
            continue
        if err == errno.ENOMEM:
            return False
        raise OSError(err, f"msync: {os.strerror(err)}")


def check_mapped(ranges: list[tuple[int, int]], what: str) -> None:
    """OSError(EFAULT) when a page of a ``(ptr, nbytes)`` range is not mapped; ranges whose
    pages overlap or touch are checked with one call (``native/src/mem_check.cc``)."""
    live = sorted((p, n) for p, n in ranges if n)
    if len(live) == 1:
        p, n = live[0]
        if not _pages_mapped(p & -_PAGE, (p + n - 1) & -_PAGE):
            raise _not_mapped(p, n, what)
        return
    run: list[tuple[int, int]] = []
    first = last = 0
    for p, n in live + [(-1, 0)]:
        f, lp = p & -_PAGE, (p + n - 1) & -_PAGE
        if run and p >= 0 and (f <= last or f - last <= _PAGE):
            last = max(last, lp)
            run.append((p, n))
            continue
        if run and not _pages_mapped(first, last):
            for rp, rn in run:
                check_mapped([(rp, rn)], what)
            raise _not_mapped(first, last - first + _PAGE, what)
        run, first, last = [(p, n)], f, lp


# ---- segment files ------------------------------------------------------------------------

_LINK = "is a symbolic link (recoverkit never opens a file through a link)"
_SPECIAL = "is a FIFO, socket or device, not a regular file"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a special file"


def _items(items: Iterable[Any], n: int, shape: str) -> list[tuple[Any, ...]]:
    out = []
    for item in items:
        t = tuple(item)
        if len(t) != n:
            raise ValueError(f"segment items must be {shape}")
        out.append(t)
    return out


def _pwrite_all(fd: int, mv: memoryview, off: int, path: str) -> None:
    while mv:
        try:
            w = os.pwrite(fd, mv, off)
        except OSError as e:
            if e.errno == errno.EINVAL and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                continue  # the file system refused O_DIRECT: finish buffered
            if e.errno is None:
                raise
            raise OSError(e.errno, os.strerror(e.errno), path) from None
        if w == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        mv, off = mv[w:], off + w


def _align_up(v: int) -> int:
    return -(-v // _BLOCK) * _BLOCK


class _DirectWriter:
    """Mirror of the native O_DIRECT writer: aligned sources go straight out, the rest
    through a window of the file in an aligned bounce buffer, partial blocks zero-padded."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path
        self.buf = mmap.mmap(-1, _BOUNCE)  # page-aligned
        self.addr = _address_of(self.buf)
        self.active, self.start, self.len, self.end = False, 0, 0, 0

    def write(self, off: int, src: int, n: int) -> None:
        buf = self.buf
        if self.active and off >= _align_up(self.start + self.len):
            self.flush_tail()
        if self.active:
            buf[self.len:off - self.start] = bytes(off - self.start - self.len)
            self.len = off - self.start
        else:
            if off % _BLOCK == 0 and src % _BLOCK == 0 and n >= _BLOCK:
                direct = n // _BLOCK * _BLOCK
                _pwrite_all(self.fd, memoryview(_at(src, direct)).cast("B"), off, self.path)
                self.end = max(self.end, off + direct)
                off, src, n = off + direct, src + direct, n - direct
                if n == 0:
                    return
            self.start = off // _BLOCK * _BLOCK
            self.len = off - self.start
            buf[:self.len] = bytes(self.len)
            self.active = True
        while n:
            take = min(n, _BOUNCE - self.len)
            ctypes.memmove(self.addr + self.len, src, take)
            self.len, src, n = self.len + take, src + take, n - take
            if self.len == _BOUNCE:
                _pwrite_all(self.fd, memoryview(buf), self.start, self.path)
                self.end = max(self.end, self.start + _BOUNCE)
                self.start, self.len = self.start + _BOUNCE, 0

    def flush_tail(self) -> None:
        if self.active and self.len:
            padded = _align_up(self.len)
            self.buf[self.len:padded] = bytes(padded - self.len)
            _pwrite_all(self.fd, memoryview(self.buf)[:padded], self.start, self.path)
            self.end = max(self.end, self.start + padded)
        self.active, self.len = False, 0


def _open_for_write(path: str, direct: bool) -> tuple[int, bool]:
    """Opens (creating, 0644) a regular file with one link to rewrite: never through a
    symlink, never blocking on a FIFO; checked on the descriptor, then emptied."""
    flags = (os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
             | os.O_NOCTTY)
    fd, is_direct = -1, False
    try:
        if direct:
            try:
                fd, is_direct = os.open(path, flags | os.O_DIRECT, 0o644), True
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ELOOP, errno.ENXIO):
                    raise
        if fd < 0:
            fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(e.errno, _LINK, path) from None
        if e.errno == errno.ENXIO:
            raise OSError(e.errno, _SPECIAL, path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"is {_kind(st.st_mode)}, not a regular file", path)
        if st.st_nlink > 1:
            raise OSError(errno.EMLINK, f"has {st.st_nlink} hard links; refusing to rewrite a "
                                        "file that other names share", path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if st.st_size:
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd, is_direct


def write_segment(path: Any, items: Iterable[Any], *, direct: bool = False,
                  fsync: bool = True, crc: bool = False) -> list[int] | None:
    path = _fs_path(path)
    parsed = []
    for off, ptr, n in _items(items, 3, "(file_offset, src_ptr, nbytes)"):
        off, ptr, n = _nonneg(off, "file_offset"), _nonneg(ptr, "src_ptr"), _nonneg(n, "nbytes")
        if n > 0 and ptr == 0:
            raise ValueError("src_ptr is 0 (null) with nbytes > 0")
        parsed.append((off, ptr, n))
    ordered = sorted(parsed, key=lambda it: it[0])
    size = prev_end = 0
    for off, _, n in ordered:
        if n > _I64_MAX - off:
            raise OverflowError(f"segment item [{off}, +{n}) ends past the largest file offset")
        if n and off < prev_end:
            raise ValueError(f"segment items overlap at file offset {off}")
        if n:
            prev_end = off + n
        size = max(size, off + n)
    check_mapped([(ptr, n) for _, ptr, n in parsed], f"write_segment {path}: src_ptr")

    fd = -1
    try:
        fd, is_direct = _open_for_write(path, direct)
        written_end = 0
        if is_direct:
            w = _DirectWriter(fd, path)
            for off, ptr, n in ordered:
                if n:
                    w.write(off, ptr, n)
            w.flush_tail()
            w.buf.close()
            written_end = w.end
        else:
            for off, ptr, n in parsed:
                if n:
                    _pwrite_all(fd, memoryview(_at(ptr, n)).cast("B"), off, path)
                    written_end = max(written_end, off + n)
        if written_end != size:
            os.ftruncate(fd, size)
        if fsync:
            os.fsync(fd)
        fd, closing = -1, fd
        os.close(closing)
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, os.strerror(e.errno), path) from None
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    if not crc:
        return None  # the CRCs below read sources the kernel already read (EFAULT first)
    return [google_crc32c.extend(0, _at(ptr, n)) if n else 0 for _, ptr, n in parsed]


def _open_for_read(path: str) -> tuple[int, int]:
    """A segment file to read, and its size: a symlink, a FIFO, a device or anything else
    that is not a regular file is a damaged checkpoint; nothing blocks."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise IntegrityError(f"{path} {_LINK}", path=path) from None
        if e.errno == errno.ENXIO:
            raise IntegrityError(f"{path} {_SPECIAL}", path=path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{path} is {_kind(st.st_mode)}, not a regular file", path=path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def _expected_crc(v: Any, path: str, off: int, n: int) -> int:
    v = operator.index(v)
    if not 0 <= v <= 0xFFFFFFFF:
        raise IntegrityError(f"{path}: expected_crc {v} of the item at file offset {off} ({n} bytes) "
                             "is not a CRC-32C (an integer in [0, 2**32)); every item is verified",
                             path=path)
    return v


def read_segment(path: Any, items: Iterable[Any]) -> list[int]:
    path = _fs_path(path)
    parsed = []
    for off, ptr, n, expected in _items(items, 4, "(file_offset, dst_ptr, nbytes, expected_crc)"):
        off, ptr, n = _nonneg(off, "file_offset"), _nonneg(ptr, "dst_ptr"), _nonneg(n, "nbytes")
        if n > 0 and ptr == 0:
            raise ValueError("dst_ptr is 0 (null) with nbytes > 0")
        parsed.append((off, ptr, n, _expected_crc(expected, path, off, n)))
    fd, size = _open_for_read(path)
    try:
        for off, _, n, _ in parsed:  # every region inside the file before any byte is read
            if off + n > size:
                raise IntegrityError(f"truncated: {path} has {size} bytes, item needs "
                                     f"[{off}, {off + n})", path=path)
        check_mapped([(ptr, n) for _, ptr, n, _ in parsed], f"read_segment {path}: dst_ptr")
        return _read_items(fd, path, parsed)
    finally:
        os.close(fd)


def _read_items(fd: int, path: str, parsed: list[tuple[int, int, int, int]]) -> list[int]:
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        crcs = []
        for off, ptr, n, expected in parsed:
            value = done = 0
            while done < n:
                piece = _at(ptr + done, min(_PIECE, n - done))
                r = os.preadv(fd, [piece], off + done)
                if r == 0:
                    raise IntegrityError(f"truncated: {path} has {off + done} bytes, item needs "
                                         f"[{off}, {off + n})", path=path)
                value = google_crc32c.extend(value, _at(ptr + done, r))
                done += r
            if value != expected:
                raise IntegrityError(
                    f"crc32c mismatch in {path} at offset {off} ({n} bytes): expected "
                    f"0x{expected:08x}, found 0x{value:08x}", path=path)
            crcs.append(value)
        return crcs
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, os.strerror(e.errno), path) from None
        raise
