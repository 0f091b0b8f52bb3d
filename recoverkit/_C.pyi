"""Type stubs of the native copy/IO engine ``recoverkit._C`` (C++17, pybind11).

``recoverkit._fallback`` implements the same names in Python; ``recoverkit._native.engine``
is whichever was selected. Every blocking call releases the GIL. Errors are Python
exceptions: ``ValueError`` for bad arguments, ``recoverkit.errors.PoolExhaustedError``,
``CopyError``, ``IntegrityError`` (checksum mismatch or truncation), and ``OSError`` with the
errno and path for I/O failures (ENOSPC, EIO, short writes).
"""

from typing import Any

BACKEND: str  # "native"

def crc32c(data: Any, value: int = 0) -> int:
    """CRC-32C of a C-contiguous buffer, extending ``value``."""

def crc32c_ptr(ptr: int, nbytes: int, value: int = 0) -> int:
    """CRC-32C of ``nbytes`` at a raw address."""

def crc32c_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """CRC of A+B from the CRCs of A and B and the length of B."""

def hardware_crc32c() -> bool:
    """True when the SSE4.2 instruction is used (software slicing-by-8 otherwise)."""

def cuda_available() -> bool:
    """True when a CUDA driver was found at run time (loaded dynamically)."""

class StagingPool:
    """One page-aligned arena; first-fit, coalescing slot allocation; optional mlock and
    CUDA host registration."""

    def __init__(
        self, capacity_bytes: int, *, alignment: int = 4096, lock_memory: bool = False,
        register_cuda: bool = True,
    ) -> None: ...
    def alloc(self, nbytes: int) -> int:
        """An aligned offset; PoolExhaustedError when no hole is large enough."""
    def free(self, offset: int) -> None: ...
    def address(self, offset: int) -> int: ...
    def view(self, offset: int, nbytes: int) -> memoryview: ...
    def close(self) -> None: ...
    def __enter__(self) -> StagingPool: ...
    def __exit__(self, *exc: object) -> None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def high_water(self) -> int: ...
    @property
    def alignment(self) -> int: ...
    @property
    def locked(self) -> bool: ...
    @property
    def cuda_registered(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def base_ptr(self) -> int: ...

class CopyHandle:
    def wait(self, timeout_s: float | None = None) -> bool: ...
    def done(self) -> bool: ...
    @property
    def error(self) -> str | None: ...
    def result(self, timeout_s: float | None = None) -> int:
        """The CRC-32C of the copied bytes; CopyError if the copy failed, TimeoutError."""
    @property
    def crc32c(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def elapsed_s(self) -> float: ...

class CopyEngine:
    """N worker threads copying ``(src, nbytes) -> dst`` in chunks with CRC on the fly;
    device sources (``device >= 0``) copy asynchronously on a dedicated stream ordered after
    an event recorded on ``stream``."""

    def __init__(self, num_threads: int = 2, chunk_bytes: int = 8 << 20) -> None: ...
    def submit(
        self, src_ptr: int, dst_ptr: int, nbytes: int, *, crc: bool = True, device: int = -1,
        stream: int = 0,
    ) -> CopyHandle: ...
    def close(self) -> None: ...
    def stats(self) -> dict[str, int]: ...

def write_segment(path: str, items: list[tuple[int, int, int]], *, direct: bool = False,
                  fsync: bool = True, crc: bool = False) -> list[int] | None:
    """Writes ``(file_offset, src_ptr, nbytes)`` items with pwrite (optionally O_DIRECT,
    through writer threads) and fsyncs; every return code checked. With ``crc=True``
    returns each item's CRC-32C (in ``items`` order), computed in the same pass."""

def read_segment(path: str, items: list[tuple[int, int, int, int]]) -> list[int]:
    """Reads ``(file_offset, dst_ptr, nbytes, expected_crc or -1)`` items; returns the CRCs;
    IntegrityError on mismatch or truncation."""
