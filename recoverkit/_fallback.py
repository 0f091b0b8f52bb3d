"""The pure-Python engine: the interface of ``recoverkit._C`` without a compiler.

Selected by ``recoverkit._native`` when ``RECOVERKIT_NATIVE=0`` or when the extension is
missing. Same names, same allocation algorithm (identical offsets for the same alloc/free
sequence), same validation and exceptions, byte-identical segment files. Memory at raw
addresses is reached through ``ctypes`` after the same mapping check as the native
engine; CRC-32C comes from ``google_crc32c``. Argument checks, raw memory and segment files
live in ``recoverkit._fallback_io``.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import queue
import threading
import time
from typing import Any

import google_crc32c

from ._fallback_io import (
    _address_of,
    _at,
    _crc_value,
    _int,
    _libc,
    _nonneg,
    check_mapped,
    read_segment,
    write_segment,
)
from .errors import CopyError, PoolExhaustedError

__all__ = [
    "BACKEND", "crc32c", "crc32c_ptr", "crc32c_combine", "hardware_crc32c", "cuda_available",
    "StagingPool", "CopyEngine", "CopyHandle", "write_segment", "read_segment",
]

BACKEND = "python"
_PIECE = 1 << 20  # copy this much, then checksum it while it is in cache
_POLY = 0x82F63B78


# ---- CRC-32C ------------------------------------------------------------------------------

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
    check_mapped([(ptr, nbytes)], "crc32c_ptr: ptr")
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
    crc_a, crc_b = _crc_value(crc_a, "crc_a"), _crc_value(crc_b, "crc_b")
    len_b = _nonneg(len_b, "len_b")
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

class StagingPool:
    def __init__(
        self, capacity_bytes: int, *, alignment: int = 4096, lock_memory: bool = False,
        register_cuda: bool = True,
    ) -> None:
        capacity, alignment = _int(capacity_bytes, "capacity_bytes"), _nonneg(alignment, "alignment")
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
        num_threads, chunk_bytes = _int(num_threads, "num_threads"), _int(chunk_bytes, "chunk_bytes")
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
        nbytes, device = _nonneg(nbytes, "nbytes"), _int(device, "device")
        _nonneg(stream, "stream")
        if not -(1 << 31) <= device < 1 << 31:
            raise OverflowError(f"device must fit in a C int, got {device}")
        if nbytes > 0 and (src == 0 or dst == 0):
            raise ValueError("src_ptr and dst_ptr must be non-null when nbytes > 0")
        if device >= 0:
            raise RuntimeError("no CUDA driver")
        # checked at submit, so a bad pointer is an error here, not a signal in a worker
        check_mapped([(src, nbytes)], "CopyEngine.submit: src_ptr")
        check_mapped([(dst, nbytes)], "CopyEngine.submit: dst_ptr")
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
