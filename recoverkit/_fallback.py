"""The pure-Python engine: the interface of ``recoverkit._C`` without a compiler.

Selected by ``recoverkit._native`` when ``RECOVERKIT_NATIVE=0`` or when the extension is
missing. Same names, same allocation algorithm (identical offsets for the same alloc/free
sequence), same validation and exceptions, byte-identical segment files. Memory at raw
addresses is reached through ``ctypes``; CRC-32C comes from ``google_crc32c``.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import operator
import os
import queue
import threading
import time
from collections.abc import Iterable
from typing import Any

import google_crc32c

from .errors import CopyError, IntegrityError, PoolExhaustedError

__all__ = [
    "BACKEND", "crc32c", "crc32c_ptr", "crc32c_combine", "hardware_crc32c", "cuda_available",
    "StagingPool", "CopyEngine", "CopyHandle", "write_segment", "read_segment",
]

BACKEND = "python"
_BLOCK = 4096  # O_DIRECT alignment
_BOUNCE = 8 << 20
_PIECE = 1 << 20  # copy/read this much, then checksum it while it is in cache
_POLY = 0x82F63B78


# ---- CRC-32C ------------------------------------------------------------------------------

def _nonneg(v: Any, name: str) -> int:
    v = operator.index(v)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def _crc_value(value: Any) -> int:
    value = operator.index(value)
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"value must be a 32-bit CRC in [0, 2**32), got {value}")
    return value


def _at(ptr: int, nbytes: int) -> Any:
    """A ctypes view of ``nbytes`` at address ``ptr`` (no copy)."""
    return (ctypes.c_char * nbytes).from_address(ptr)


def _address_of(mm: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)
    del anchor  # release the buffer export, so the mmap can still be closed
    return addr


def crc32c(data: Any, value: int = 0) -> int:
    value = _crc_value(value)
    if isinstance(data, bytes):
        return google_crc32c.extend(value, data)
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise BufferError("crc32c needs a C-contiguous buffer")
    if mv.nbytes == 0:
        return value
    mv = mv.cast("B") if (mv.ndim, mv.format) != (1, "B") else mv
    arg = bytes(mv) if mv.readonly else (ctypes.c_char * mv.nbytes).from_buffer(mv)
    return google_crc32c.extend(value, arg)


def crc32c_ptr(ptr: int, nbytes: int, value: int = 0) -> int:
    ptr, nbytes, value = _nonneg(ptr, "ptr"), _nonneg(nbytes, "nbytes"), _crc_value(value)
    if nbytes == 0:
        return value
    if ptr == 0:
        raise ValueError("ptr is 0 (null) with nbytes > 0")
    return google_crc32c.extend(value, _at(ptr, nbytes))


def _multmodp(a: int, b: int) -> int:
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    crc_a, crc_b, len_b = _crc_value(crc_a), _crc_value(crc_b), _nonneg(len_b, "len_b")
    if len_b == 0:
        return crc_a
    p, k = 1 << 31, 3  # x^0; multiply by x^(8 * len_b)
    while len_b:
        if len_b & 1:
            p = _multmodp(_X2N[k & 31], p)
        len_b >>= 1
        k += 1
    return _multmodp(p, crc_a) ^ crc_b


def hardware_crc32c() -> bool:
    return False


def cuda_available() -> bool:
    return False


# ---- staging pool -------------------------------------------------------------------------

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class StagingPool:
    def __init__(
        self, capacity_bytes: int, *, alignment: int = 4096, lock_memory: bool = False,
        register_cuda: bool = True,
    ) -> None:
        capacity, alignment = operator.index(capacity_bytes), _nonneg(alignment, "alignment")
        if capacity <= 0:
            raise ValueError("capacity_bytes must be positive")
        if alignment == 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self._capacity, self._alignment = capacity, alignment
        self._lock = threading.Lock()
        self._free: list[list[int]] = [[0, capacity]]  # [offset, length], sorted by offset
        self._allocated: dict[int, int] = {}
        self._used = self._high_water = 0
        self._locked = False
        extra = alignment if alignment > mmap.PAGESIZE else 0
        self._mm: mmap.mmap | None = mmap.mmap(-1, capacity + extra)
        addr = _address_of(self._mm)
        self._skew = (-addr) % alignment if extra else 0
        self._base = addr + self._skew
        if lock_memory:
            if _libc.mlock(ctypes.c_void_p(self._base), ctypes.c_size_t(capacity)) != 0:
                err = ctypes.get_errno()
                self.close()
                raise OSError(err, f"mlock of the staging pool: {os.strerror(err)} "
                                   "(raise RLIMIT_MEMLOCK or pass lock_memory=False)")
            self._locked = True

    def _check_open(self) -> None:
        if self._mm is None:
            raise ValueError("pool is closed")

    def alloc(self, nbytes: int) -> int:
        nbytes = _nonneg(nbytes, "nbytes")
        with self._lock:
            self._check_open()
            want = max(nbytes, 1)
            if want <= self._capacity:
                need = -(-want // self._alignment) * self._alignment
                for i, (off, length) in enumerate(self._free):
                    if length < need:
                        continue
                    if length == need:
                        del self._free[i]
                    else:
                        self._free[i] = [off + need, length - need]
                    self._allocated[off] = need
                    self._used += need
                    self._high_water = max(self._high_water, self._used)
                    return off
            largest = max((length for _, length in self._free), default=0)
            raise PoolExhaustedError(
                f"staging pool exhausted: requested {nbytes} bytes, largest free range "
                f"{largest} bytes, capacity {self._capacity} bytes ({self._used} in use)")

    def free(self, offset: int) -> None:
        offset = _nonneg(offset, "offset")
        with self._lock:
            self._check_open()
            length = self._allocated.pop(offset, None)
            if length is None:
                raise ValueError(f"free of offset {offset}, which is not allocated "
                                 "(unknown or already freed)")
            self._used -= length
            start, i = offset, bisect.bisect_left(self._free, [offset, 0])
            if i < len(self._free) and self._free[i][0] == start + length:  # right neighbour
                length += self._free.pop(i)[1]
            if i > 0 and sum(self._free[i - 1]) == start:  # left neighbour
                i -= 1
                start = self._free[i][0]
                length += self._free.pop(i)[1]
            self._free.insert(i, [start, length])

    def address(self, offset: int) -> int:
        offset = _nonneg(offset, "offset")
        self._check_open()
        if offset >= self._capacity:
            raise ValueError(f"offset {offset} is outside the pool (capacity {self._capacity})")
        return self._base + offset

    def view(self, offset: int, nbytes: int) -> memoryview:
        offset, nbytes = _nonneg(offset, "offset"), _nonneg(nbytes, "nbytes")
        with self._lock:
            self._check_open()
            assert self._mm is not None
            if offset > self._capacity or nbytes > self._capacity - offset:
                raise ValueError(f"range [{offset}, {offset} + {nbytes}) is outside the pool "
                                 f"(capacity {self._capacity})")
            start = self._skew + offset
            return memoryview(self._mm)[start:start + nbytes]  # holds the mmap alive

    def close(self) -> None:
        with self._lock:
            mm, self._mm = self._mm, None
            if mm is None:
                return
            if self._locked:
                _libc.munlock(ctypes.c_void_p(self._base), ctypes.c_size_t(self._capacity))
                self._locked = False
            self._free, self._allocated, self._used = [], {}, 0
            try:
                mm.close()
            except BufferError:
                pass  # views are alive: the mapping goes away with the last of them

    def __enter__(self) -> StagingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_mm", None) is not None:
            self.close()

    capacity = property(lambda self: self._capacity)
    used = property(lambda self: self._used)
    high_water = property(lambda self: self._high_water)
    alignment = property(lambda self: self._alignment)
    locked = property(lambda self: self._locked)
    cuda_registered = property(lambda self: False)
    closed = property(lambda self: self._mm is None)

    @property
    def base_ptr(self) -> int:
        self._check_open()
        return self._base

    def __repr__(self) -> str:
        return (f"<StagingPool capacity={self._capacity} used={self._used}"
                f"{' closed' if self.closed else ''}>")


# ---- copy engine --------------------------------------------------------------------------

class CopyHandle:
    def __init__(self, nbytes: int) -> None:
        self._nbytes = nbytes
        self._event = threading.Event()
        self._error: str | None = None
        self._crc = 0
        self._t0 = time.perf_counter()
        self._t1: float | None = None

    def _finish(self, crc: int = 0, error: str | None = None) -> None:
        self._crc, self._error, self._t1 = crc, error, time.perf_counter()
        self._event.set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._event.wait(None if timeout_s is None else max(0.0, timeout_s))

    def done(self) -> bool:
        return self._event.is_set()

    @property
    def error(self) -> str | None:
        return self._error if self._event.is_set() else None

    def result(self, timeout_s: float | None = None) -> int:
        if not self.wait(timeout_s):
            raise TimeoutError(f"copy of {self._nbytes} bytes not finished after {timeout_s:g} s")
        if self._error is not None:
            raise CopyError(f"copy failed: {self._error}")
        return self._crc

    @property
    def crc32c(self) -> int:
        if not self._event.is_set():
            raise ValueError("copy not finished; wait() first")
        if self._error is not None:
            raise ValueError(f"copy failed: {self._error}")
        return self._crc

    nbytes = property(lambda self: self._nbytes)

    @property
    def elapsed_s(self) -> float:
        return (self._t1 if self._t1 is not None else time.perf_counter()) - self._t0

    def __repr__(self) -> str:
        state = "pending" if not self.done() else "failed" if self._error else "done"
        return f"<CopyHandle nbytes={self._nbytes} {state}>"


class CopyEngine:
    """Each worker copies one job at a time, chunk by chunk (ctypes.memmove drops the GIL)."""

    def __init__(self, num_threads: int = 2, chunk_bytes: int = 8 << 20) -> None:
        num_threads, chunk_bytes = operator.index(num_threads), operator.index(chunk_bytes)
        if not 1 <= num_threads <= 1024:
            raise ValueError(f"num_threads must be in [1, 1024], got {num_threads}")
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self._num_threads, self._chunk = num_threads, chunk_bytes
        self._queue: queue.SimpleQueue[tuple[CopyHandle, int, int, bool] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._stats = {"bytes_copied": 0, "copies_done": 0, "copies_failed": 0, "copies_pending": 0}
        self._workers = [threading.Thread(target=self._run, daemon=True, name=f"rk-copy-{i}")
                         for i in range(num_threads)]
        for t in self._workers:
            t.start()

    def submit(self, src_ptr: int, dst_ptr: int, nbytes: int, *, crc: bool = True,
               device: int = -1, stream: int = 0) -> CopyHandle:
        src, dst = _nonneg(src_ptr, "src_ptr"), _nonneg(dst_ptr, "dst_ptr")
        nbytes = operator.index(nbytes)
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        if nbytes > 0 and (src == 0 or dst == 0):
            raise ValueError("src_ptr and dst_ptr must be non-null when nbytes > 0")
        if operator.index(device) >= 0:
            raise RuntimeError("no CUDA driver")
        handle = CopyHandle(nbytes)
        with self._lock:
            if self._closed:
                raise ValueError("engine is closed")
            if nbytes == 0:
                self._stats["copies_done"] += 1
                handle._finish(0)
                return handle
            self._stats["copies_pending"] += 1
            self._queue.put((handle, src, dst, bool(crc)))
        return handle

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            handle, src, dst, want_crc = job
            if self._closed:
                self._complete(handle, 0, "engine closed")
                continue
            value, error = 0, None
            try:
                for off in range(0, handle.nbytes, _PIECE):
                    n = min(_PIECE, handle.nbytes - off)
                    ctypes.memmove(dst + off, src + off, n)
                    if want_crc:
                        value = google_crc32c.extend(value, _at(dst + off, n))
            except Exception as e:  # pragma: no cover - ctypes faults are not catchable anyway
                error = str(e) or type(e).__name__
            self._complete(handle, value, error)

    def _complete(self, handle: CopyHandle, value: int, error: str | None) -> None:
        with self._lock:
            self._stats["copies_pending"] -= 1
            if error is None:
                self._stats["bytes_copied"] += handle.nbytes
                self._stats["copies_done"] += 1
            else:
                self._stats["copies_failed"] += 1
        handle._finish(value, error)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for _ in self._workers:
            self._queue.put(None)
        for t in self._workers:
            t.join()

    def __enter__(self) -> CopyEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    num_threads = property(lambda self: self._num_threads)
    chunk_bytes = property(lambda self: self._chunk)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)


# ---- segment files ------------------------------------------------------------------------

def _items(items: Iterable[Any], n: int, shape: str) -> list[tuple[int, ...]]:
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
            raise OSError(e.errno, os.strerror(e.errno), path) from None
        if w == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        mv, off = mv[w:], off + w


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


def _align_up(v: int) -> int:
    return -(-v // _BLOCK) * _BLOCK


def write_segment(path: str, items: list[tuple[int, int, int]], *, direct: bool = False,
                  fsync: bool = True, crc: bool = False) -> list[int] | None:
    parsed = []
    for off, ptr, n in _items(items, 3, "(file_offset, src_ptr, nbytes)"):
        off, ptr, n = _nonneg(off, "file_offset"), _nonneg(ptr, "src_ptr"), _nonneg(n, "nbytes")
        if n > 0 and ptr == 0:
            raise ValueError("src_ptr is 0 (null) with nbytes > 0")
        parsed.append((off, ptr, n))
    path = os.fsdecode(path)
    ordered = sorted(parsed, key=lambda it: it[0])
    size = prev_end = 0
    for off, _, n in ordered:
        if n and off < prev_end:
            raise ValueError(f"segment items overlap at file offset {off}")
        if n:
            prev_end = off + n
        size = max(size, off + n)

    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    fd, is_direct = -1, False
    try:
        if direct:
            try:
                fd, is_direct = os.open(path, flags | os.O_DIRECT, 0o644), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
        if fd < 0:
            fd = os.open(path, flags, 0o644)
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
        return None
    return [crc32c_ptr(ptr, n) if n else 0 for _, ptr, n in parsed]


def read_segment(path: str, items: list[tuple[int, int, int, int]]) -> list[int]:
    parsed = []
    for off, ptr, n, expected in _items(items, 4, "(file_offset, dst_ptr, nbytes, expected_crc)"):
        off, ptr, n = _nonneg(off, "file_offset"), _nonneg(ptr, "dst_ptr"), _nonneg(n, "nbytes")
        expected = operator.index(expected)
        if n > 0 and ptr == 0:
            raise ValueError("dst_ptr is 0 (null) with nbytes > 0")
        if not -1 <= expected <= 0xFFFFFFFF:
            raise ValueError("expected_crc must be -1 or in [0, 2**32)")
        parsed.append((off, ptr, n, expected))
    path = os.fsdecode(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        for off, _, n, _ in parsed:
            if off + n > size:
                raise IntegrityError(f"truncated: {path} has {size} bytes, item needs "
                                     f"[{off}, {off + n})", path=path)
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
            if expected >= 0 and value != expected:
                raise IntegrityError(
                    f"crc32c mismatch in {path} at offset {off} ({n} bytes): expected "
                    f"0x{expected:08x}, found 0x{value:08x}", path=path)
            crcs.append(value)
        return crcs
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, os.strerror(e.errno), path) from None
        raise
    finally:
        os.close(fd)
